"""The compose stack, started for real on this machine's engine from the locally built images:
a task submitted from the host's CLI runs in it and is traced; a second worker host (its own
engine, gateway and worker) joins over the network, runs a task from its own queue, and when
stopped with a task in flight ends that task cancelled with its credentials revoked; `down`
leaves no container, volume, network, socket or cgroup behind.

The stack is this checkout's own (`scripts/stack`); a stack already running is left alone
and the tests fail saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, ROOT, _service_missing

pytestmark = [pytest.mark.docker, pytest.mark.slow]

STACK = ROOT / "scripts" / "stack"
ENV_FILE = ROOT / ".airlock" / "stack.env"
API = f"http://127.0.0.1:{os.environ.get('AIRLOCK_STACK_API_PORT', '18600')}"
NAMESPACE = "stack"
HOST = "host2"


def stack(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(STACK), *args], capture_output=True, text=True, timeout=timeout
    )


def docker(*args: str) -> str:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def airlock(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The host's CLI, pointed at the stack by .airlock/stack.env (as a user would)."""
    env = {**os.environ, "AIRLOCK_TOKEN": token or ""}
    script = 'source "$1" && shift && exec "$@"'
    return subprocess.run(
        ["bash", "-c", script, "_", str(ENV_FILE), sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def leaks() -> dict[str, str]:
    """What a stopped stack must not leave: its containers, volumes, network, sockets."""
    left = {
        "containers": docker("ps", "-aq", "--filter", f"label=airlock.namespace={NAMESPACE}"),
        "stack": docker("ps", "-aq", "--filter", "label=com.docker.compose.project=airlock"),
        "volumes": docker(
            "volume", "ls", "-q", "--filter", "label=com.docker.compose.project=airlock"
        ),
        "network": docker("network", "ls", "-q", "--filter", "name=^airlock-stack$"),
        "sockets": " ".join(str(p) for p in Path("/run/airlock-stack/endpoints").glob("*")),
        "cgroups": " ".join(str(p) for p in Path("/sys/fs/cgroup").glob("*/airlock-host-*")),
    }
    return {what: ids for what, ids in left.items() if ids}


@pytest.fixture(scope="module")
def up() -> Iterator[str]:
    """The stack, up and healthy; a token of alice's from its issuer."""
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], capture_output=True).returncode
    ):
        _service_missing("Docker engine", Exception("docker info failed"))
    if docker("ps", "-q", "--filter", "label=com.docker.compose.project=airlock"):
        pytest.fail("a stack is already running here: `scripts/stack down` first", pytrace=False)
    try:
        proc = stack("up")
        if proc.returncode and not IN_CI and "no pinned Docker Compose" in proc.stderr:
            pytest.skip(proc.stderr.strip())
        ok(proc)
        yield ok(airlock("dev", "token", "alice")).strip()
    finally:
        stack("down", "--volumes")


def waited(proc: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """What `submit --wait` printed: the task's output, and its id (from the last line)."""
    *output, last = ok(proc).splitlines()
    assert last.startswith("task ") and " succeeded: exit code 0 " in last, last
    return "\n".join(output), last.split()[1]


def hello(token: str, text: str, *options: str) -> str:
    """Submit `print(text)` and wait: checks what it printed, returns the task's id."""
    printed, task_id = waited(
        airlock(
            "submit", "--agent", "demo", *options, "--wait", "--",
            "python3", "-c", f"print({text!r})",
            token=token,
        )
    )  # fmt: skip
    assert printed == text
    return task_id


def running_sleeper(token: str, *options: str) -> str:
    """Submit a task that sleeps five minutes; returns its id once it runs."""
    submit = ["submit", "--agent", "demo", *options, "--json", "--", "sleep", "300"]
    task_id: str = json.loads(ok(airlock(*submit, token=token)))["id"]
    for _ in range(300):
        if task_status(task_id, token)["state"] == "running":
            return task_id
        time.sleep(0.1)
    pytest.fail(f"the task never ran ({task_status(task_id, token)['state']})")


def task_status(task_id: str, token: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(ok(airlock("status", "--json", task_id, token=token)))
    return status


def spans(task_id: str, token: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(ok(airlock("trace", "--json", task_id, token=token)))
    return found


def test_every_service_is_healthy_and_the_console_answers(up: str) -> None:
    rows = [json.loads(line) for line in ok(stack("status", "--json")).splitlines() if line]
    states = {row["Service"]: (row["State"], row["Health"], row["ExitCode"]) for row in rows}
    assert states.pop("setup") == ("exited", "", 0)  # the one-shot set-up did its work
    assert set(states) == {
        "redis",
        "rabbitmq",
        "postgres",
        "vault",
        "api",
        "gateway",
        "worker",
        "beat",
    }
    for service, (state, health, _) in states.items():
        assert state == "running", service
        assert health in ("healthy", "") and (health or service == "beat"), service
    with urllib.request.urlopen(f"{API}/ui/login") as page:
        assert page.status == 200 and b"Airlock" in page.read()
    # No secret reached a container's environment: they are files under /run/secrets.
    for row in rows:
        env = docker("inspect", "-f", "{{json .Config.Env}}", row["Name"])
        secrets_dir = ROOT / ".airlock" / "stack" / "secrets"
        for secret in secrets_dir.glob("redis-*"):
            assert secret.read_text() not in env, (row["Service"], secret.name)


def test_a_task_from_the_hosts_cli_runs_in_the_stack_and_is_traced(up: str) -> None:
    task_id = hello(up, "hello, stack")
    status = task_status(task_id, up)
    assert status["state"] == "succeeded" and status["submitter"] == "user:alice"
    assert status["worker"].endswith("@worker-1")
    found = spans(task_id, up)
    services = {s["service"] for s in found}
    assert {"airlock-api", "airlock-worker"} <= services
    names = {s["name"] for s in found}
    assert {"submit", "task", "admit", "provision", "run", "teardown"} <= names
    hosts = {s["service"]: s["host"] for s in found}
    assert hosts["airlock-worker"] == "worker-1"


def test_a_second_host_joins_runs_its_own_queue_and_leaves_clean(up: str) -> None:
    ok(stack("join", HOST))
    try:
        task_id = hello(up, "hello from the second host", "--queue", HOST)
        assert task_status(task_id, up)["worker"].endswith(f"@{HOST}")
        found = spans(task_id, up)
        # One trace across machines: the front door's spans on the stack's API host, the
        # task's on the second host (its worker, its gateway, its engine's calls).
        by_name = {s["name"]: s for s in found}
        assert by_name["submit"]["host"] != HOST
        assert by_name["task"]["host"] == HOST and by_name["run"]["host"] == HOST
        assert {s["trace_id"] for s in found} == {by_name["submit"]["trace_id"]}
        shown = ok(airlock("trace", task_id, token=up))  # as people read it: a HOST column
        assert "HOST" in shown.splitlines()[0] and HOST in shown
        # Its containers ran on its own engine, not on this machine's.
        assert not docker("ps", "-aq", "--filter", f"label=airlock.task_id={task_id}")

        # Stopped with a task in flight: the task ends cancelled, its credentials revoked.
        long = running_sleeper(up, "--queue", HOST)
    finally:
        left = stack("leave", HOST)
    ok(left)
    status = task_status(long, up)
    assert status["state"] == "cancelled"
    assert status["reason"].startswith("cancelled by worker ") and f"@{HOST}" in status["reason"]
    assert "shutting down on SIGTERM" in status["reason"]
    assert status["revocation"]["verified"] is True
    project = f"label=com.docker.compose.project=airlock-host-{HOST}"
    assert not docker("ps", "-aq", "--filter", project)
    assert not docker("volume", "ls", "-q", "--filter", project)
    assert not list(Path("/sys/fs/cgroup").glob(f"*/airlock-host-{HOST}"))


def test_down_leaves_nothing_behind(up: str) -> None:
    proc = stack("down", "--volumes")
    assert "nothing left behind" in ok(proc)
    assert leaks() == {}
    assert not ENV_FILE.exists()
