"""The demo's story, told with the CLI as a user types it (scripts/demo starts the stack
first). As alice: a coder task clones, installs, tests, calls an MCP tool, pushes a branch
and is refused what its grant leaves out; an ops task reads the reporting database with a
role made for it alone. Then each task's trace, egress decisions and revocation receipt,
and an independent check that nothing it was given is left: no container, no database
role, no Vault token or lease.

Ends with a summary of what was shown and checked; `--json` prints it as one object.
Exit 1 when a check fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
AIRLOCK = str(ROOT / ".venv" / "bin" / "airlock")
TASKS = {"coder": ROOT / "examples" / "coder-task.yaml", "ops": ROOT / "examples" / "ops-task.yaml"}
BOLD, RESET = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def columns() -> int:
    """The terminal's width; 120 where there is none (a log, a recording)."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return int(os.environ.get("COLUMNS") or 120)


ENV = {**os.environ, "COLUMNS": str(columns())}


def step(text: str) -> None:
    print(f"\n{BOLD}==>{RESET} {text}", flush=True)


def show(*args: str) -> None:
    """Run an airlock command for the reader to see."""
    print(f"{BOLD}$ airlock {' '.join(args)}{RESET}", flush=True)
    subprocess.run([AIRLOCK, *args], env=ENV, check=False)


def data(*args: str) -> Any:
    """An airlock command's --json answer."""
    done = subprocess.run(
        [AIRLOCK, *args, "--json"], env=ENV, capture_output=True, text=True, check=False
    )
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise SystemExit(f"airlock {' '.join(args)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def run_task(name: str) -> dict[str, Any]:
    """Submit the example task, follow its logs live, and return its final status."""
    print(f"{BOLD}$ airlock submit --file {TASKS[name].relative_to(ROOT)}{RESET}", flush=True)
    task_id = data("submit", "--file", str(TASKS[name]))["id"]
    print(task_id, flush=True)
    show("logs", "--follow", task_id)
    return data("status", task_id)


def vault(path: str, body: dict[str, Any]) -> int:
    """The HTTP status of one Vault call with the operator's token (the local stack's)."""
    request = urllib.request.Request(
        f"{os.environ['VAULT_ADDR']}/v1/{path}",
        data=json.dumps(body).encode(),
        headers={"X-Vault-Token": os.environ["VAULT_TOKEN"]},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def database_roles(name: str) -> int:
    """How many PostgreSQL roles named `name` exist, asked as Vault's database admin."""
    done = subprocess.run(
        # The name comes from the task's output: a psql variable, quoted by psql.
        ["psql", os.environ["AIRLOCK_POSTGRES_URL"], "-tA", "-v", f"role={name}"],
        input="SELECT count(*) FROM pg_roles WHERE rolname = :'role';\n",
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


def containers(task_id: str) -> int:
    done = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=airlock.task_id={task_id}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return len(done.stdout.split())


def leftovers(status: dict[str, Any], role: str | None) -> list[str]:
    """What the task was given that still exists, checked at the source of each."""
    left = []
    if containers(status["id"]):
        left.append("container")
    receipt = status.get("revocation") or {}
    accessor = (receipt.get("token") or {}).get("accessor")
    if accessor and vault("auth/token/lookup-accessor", {"accessor": accessor}) == 200:
        left.append(f"vault token {accessor[:12]}")
    for lease in receipt.get("leases") or []:
        if vault("sys/leases/lookup", {"lease_id": lease["id"]}) == 200:
            left.append(f"lease {lease['id']}")
    if role and database_roles(role):
        left.append(f"database role {role}")
    if not receipt.get("verified"):
        left.append("an unverified revocation receipt")
    return left


def main(as_json: bool) -> int:
    step("a coder task, as alice: clone, install, test, MCP, push; two requests it is not granted")
    coder = run_task("coder")
    step("an ops task, as alice: the reporting database, with a role made for this task alone")
    ops = run_task("ops")
    role = next((text.strip() for name, text in outputs(ops["id"]) if name == "role.txt"), None)

    for name, status in (("coder", coder), ("ops", ops)):
        step(f"the {name} task's life as one trace")
        show("trace", status["id"])
        step(f"the {name} task's egress decisions, each with its rule")
        show("audit", "--task", status["id"])
        step(f"the {name} task: its grant and its revocation receipt")
        show("status", status["id"])

    records = data("audit", "--task", coder["id"])
    allowed = [r for r in records if r.get("decision") == "allow"]
    denied = [r for r in records if r.get("decision") == "deny"]
    tools = {(r.get("tool"), r.get("decision")) for r in records if r.get("tool")}
    summary = {
        "tasks": {"coder": coder["id"], "ops": ops["id"]},
        "states": {"coder": coder["state"], "ops": ops["state"]},
        "allowed": len(allowed),
        "denied": len(denied),
        "denied_rules": sorted({r.get("rule", "") for r in denied}),
        "secret_injected": any(r.get("injected") == "git-token" for r in allowed),
        "database_role": role,
        "tool_called": ("lookup_issue", "allow") in tools,
        "tool_refused": ("delete_repository", "deny") in tools,
        "leaks": leftovers(coder, None) + leftovers(ops, role),
    }
    checks = {
        "both tasks succeeded": summary["states"] == {"coder": "succeeded", "ops": "succeeded"},
        "requests allowed": summary["allowed"] > 0,
        "requests denied, by rule": summary["denied"] > 0,
        "a secret used (injected by the gateway; a database role)": bool(
            summary["secret_injected"] and role
        ),
        "an MCP tool called": summary["tool_called"],
        "an MCP tool refused": summary["tool_refused"],
        "nothing left behind": not summary["leaks"],
    }
    summary["checks"] = checks
    step("what was shown, checked at the source (Docker, Vault, PostgreSQL)")
    for what, ok in checks.items():
        mark = "\033[32mok\033[0m" if ok and BOLD else ("ok" if ok else "FAILED")
        print(f"  {mark:>4}  {what}")
    print(
        f"        {summary['allowed']} allowed, {summary['denied']} denied "
        f"(rules: {', '.join(summary['denied_rules'])}); leaks: {summary['leaks'] or 'none'}"
    )
    if as_json:
        print(json.dumps(summary))
    return 0 if all(checks.values()) else 1


def outputs(task_id: str) -> list[tuple[str, str]]:
    return [(f["name"], base64.b64decode(f["base64"]).decode()) for f in data("output", task_id)]


if __name__ == "__main__":
    sys.exit(main("--json" in sys.argv[1:]))
