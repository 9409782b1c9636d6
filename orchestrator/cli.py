"""The `airlock` command. It parses, delegates to the client, and renders; nothing more.

Exit codes: 0 succeeded, 1 failed / timed out / cancelled, 2 invalid input or rejected,
3 a required service is unreachable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from orchestrator import config, render
from orchestrator.client import Client
from orchestrator.errors import AirlockError, InvalidSpec
from orchestrator.lifecycle import TaskState
from orchestrator.policy.agents import load_registry
from orchestrator.policy.engine import PolicyEngine, load_bundle
from orchestrator.policy.testing import run_policy_tests
from orchestrator.spec import json_schema, load_file, parse

EXIT_BY_STATE = {"succeeded": 0, "rejected": 2}
ADMISSION_WAIT_S = 5.0


class AirlockGroup(click.Group):
    """Turns Airlock's errors into one readable line and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AirlockError as exc:
            fail(str(exc), exc.exit_code)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"airlock: {message}", err=True)
    sys.exit(code)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidSpec([f"{option} {item!r}: expected KEY=VALUE"])
        result[key] = value
    return result


@click.group(cls=AirlockGroup)
def main() -> None:
    """Airlock: sealed, ephemeral runners for AI-agent tasks."""


@main.command()
@click.option(
    "--file",
    "-f",
    "spec_file",
    type=click.Path(path_type=Path),
    help="task spec (JSON or YAML); flags override its fields",
)
@click.option("--agent", "-a", help="agent role the task runs as")
@click.option("--image", help="runner image")
@click.option("--timeout", "timeout_s", type=int, help="deadline in seconds")
@click.option("--env", "-e", "env", multiple=True, metavar="K=V", help="environment variable")
@click.option("--label", "-l", "labels", multiple=True, metavar="K=V", help="label")
@click.option("--cpus", type=float, help="CPU cores")
@click.option("--memory", help="memory ceiling, e.g. 512m")
@click.option("--pids", type=int, help="process ceiling")
@click.option("--on-behalf-of", help="user the agent acts for")
@click.option("--queue", help="worker pool")
@click.option("--wait", "-w", is_flag=True, help="wait for the task to end and show the result")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def submit(
    spec_file: Path | None,
    command: tuple[str, ...],
    env: tuple[str, ...],
    labels: tuple[str, ...],
    wait: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Submit a task: airlock submit [OPTIONS] -- CMD ARGS..."""
    spec = parse(_spec_data(spec_file, command, env, labels, flags))
    client = Client()
    task_id = client.submit(spec)
    if not wait:
        # A worker decides admission within milliseconds; say so now if it refused.
        status = client.wait_admission(task_id, ADMISSION_WAIT_S)
        emit_json({"id": task_id, "state": status["state"]}) if as_json else click.echo(task_id)
        if status["state"] == TaskState.REJECTED.value:
            fail(f"task {task_id} rejected: {status['reason']}", 2)
        return
    with render.Progress(task_id, enabled=not as_json) as progress:
        status = client.wait(task_id, on_event=progress.event)
    if as_json:
        status["logs"] = "".join(text for _, text in client.logs(task_id))
        emit_json(status)
    else:
        for stream, text in client.logs(task_id):
            render.write_log(stream, text)
        render.summary(status)
    sys.exit(EXIT_BY_STATE.get(status["state"], 1))


def _spec_data(
    spec_file: Path | None,
    command: tuple[str, ...],
    env: tuple[str, ...],
    labels: tuple[str, ...],
    flags: dict[str, Any],
) -> dict[str, Any]:
    """The spec file's fields, overridden by whatever was given on the command line."""
    data: dict[str, Any] = load_file(spec_file).model_dump(exclude_none=True) if spec_file else {}
    for name in ("agent", "image", "timeout_s", "on_behalf_of", "queue"):
        if flags.get(name) is not None:
            data[name] = flags[name]
    limits = {k: flags[k] for k in ("cpus", "memory", "pids") if flags.get(k) is not None}
    if limits:
        data["limits"] = {**data.get("limits", {}), **limits}
    if env:
        data["env"] = {**data.get("env", {}), **pairs(env, "--env")}
    if labels:
        data["labels"] = {**data.get("labels", {}), **pairs(labels, "--label")}
    if command:
        data["command"] = list(command)
    return data


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
def status(task_id: str, as_json: bool) -> None:
    """Show a task's state, reason, exit code and output."""
    result = Client().status(task_id)
    emit_json(result) if as_json else render.status_table(result)


@main.command()
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the task ends")
def logs(task_id: str, follow: bool) -> None:
    """Print a task's stdout and stderr."""
    for stream, text in Client().logs(task_id, follow=follow):
        render.write_log(stream, text)


@main.command("list")
@click.option("--state", type=click.Choice([s.value for s in TaskState]))
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def list_tasks(state: str | None, limit: int, as_json: bool) -> None:
    """List recent tasks, newest first."""
    tasks = Client().tasks(state, limit)
    emit_json(tasks) if as_json else render.task_list(tasks)


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
def cancel(task_id: str, as_json: bool) -> None:
    """Cancel a task: a running container is stopped, a pending task never starts."""
    result = Client().cancel(task_id)
    emit_json({"id": task_id, "result": result}) if as_json else click.echo(f"{task_id}: {result}")


@main.command()
@click.argument("task_id")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="write every output file here (default: print the single file)",
)
def output(task_id: str, directory: Path | None) -> None:
    """Fetch the files a task left in /workspace/output."""
    files = Client().output(task_id)
    if directory is None:
        if len(files) != 1:
            fail(f"task has {len(files)} output files; use --dir", 2)
        sys.stdout.buffer.write(files[0][1])
        return
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files:
        (directory / Path(name).name).write_bytes(data)
        click.echo(directory / Path(name).name)


@main.group()
def spec() -> None:
    """The task spec contract."""


@spec.command()
def schema() -> None:
    """Print the JSON Schema of the task spec."""
    emit_json(json_schema())


@spec.command()
@click.argument("path", type=click.Path(path_type=Path))
def check(path: Path) -> None:
    """Validate a spec file without submitting it."""
    load_file(path)
    click.echo(f"{path}: valid")


@main.command()
@click.option("--queue", "-Q", "queues", multiple=True, help="queue to serve (repeatable)")
@click.option("--concurrency", "-c", type=click.IntRange(1, 256), help="tasks at once")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: tuple[str, ...], concurrency: int | None, loglevel: str) -> None:
    """Run a worker that executes tasks from the queue."""
    from orchestrator.worker import run_worker

    run_worker(config.load(), list(queues) or None, concurrency, loglevel)


@main.command()
@click.option("--dry-run", is_flag=True, help="only say what would be removed")
@click.option("--json", "as_json", is_flag=True)
def gc(dry_run: bool, as_json: bool) -> None:
    """Remove containers, credentials and endpoints no live task owns."""
    from orchestrator.worker import build_executor, reap_now

    found = reap_now(build_executor(config.load()), dry_run=dry_run)
    if as_json:
        emit_json([item.to_json() for item in found])
        return
    verb = "would remove" if dry_run else "removed"
    for item in found:
        click.echo(f"{verb} {item.kind} {item.id[:24]} (task {item.task_id}): {item.why}")
    click.echo(f"{len(found)} orphaned item(s)")


def _engine() -> PolicyEngine:
    """A policy engine for this host, as a worker would build it (without Docker if absent)."""
    from orchestrator.policy.engine import Deployment

    settings = config.load()

    def deployment() -> Deployment:
        from orchestrator.worker import build_executor

        try:
            return build_executor(settings).deployment()
        except AirlockError:  # no engine here: decide as if every runtime existed
            return Deployment(
                settings.runner_image,
                ("runc", "runsc"),
                settings.default_timeout_s,
                {
                    "cpus": settings.default_cpus,
                    "memory": settings.default_memory,
                    "pids": settings.default_pids,
                },
                settings.max_timeout_s,
                settings.trust_domain,
            )

    return PolicyEngine(settings.policy_dir, settings.agents_dir, deployment)


@main.group()
def agents() -> None:
    """The agent registry: one identity and ceiling per agent role."""


@agents.command("list")
@click.option("--json", "as_json", is_flag=True)
def agents_list(as_json: bool) -> None:
    """List the agent roles."""
    registry = load_registry(config.load().agents_dir)
    if as_json:
        emit_json([a.model_dump(mode="json") for a in registry.values()])
        return
    render.agent_table(list(registry.values()))


@agents.command("show")
@click.argument("name")
def agents_show(name: str) -> None:
    """Show everything one agent role may be granted."""
    registry = load_registry(config.load().agents_dir)
    if name not in registry:
        fail(f"unknown agent {name!r}; known: {', '.join(sorted(registry)) or 'none'}", 2)
    emit_json(registry[name].model_dump(mode="json"))


@main.group()
def policy() -> None:
    """The Rego policy bundle."""


@policy.command("check")
@click.option("--json", "as_json", is_flag=True)
def policy_check(as_json: bool) -> None:
    """Load the agents and policies, compile them, and run the policy tests."""
    settings = config.load()
    bundle = load_bundle(settings.policy_dir, settings.agents_dir)
    results = run_policy_tests(bundle, settings.policy_dir / "tests")
    if as_json:
        emit_json(
            {
                "version": bundle.version,
                "agents": sorted(bundle.agents),
                "tests": [r.__dict__ for r in results],
            }
        )
    else:
        click.echo(
            f"bundle {bundle.version}: {len(bundle.agents)} agents, "
            f"{len(results)} policy tests passed"
        )


@policy.command("eval")
@click.option("--file", "-f", "spec_file", type=click.Path(path_type=Path), required=True)
def policy_eval(spec_file: Path) -> None:
    """Decide a task spec without running it: decision, reasons and grant."""
    decision = _engine().admit(load_file(spec_file))
    emit_json(decision.to_json())
    sys.exit(0 if decision.allowed else 2)


@main.group()
def vault() -> None:
    """Vault (or OpenBao) configuration for the agent registry."""


@vault.command("setup")
@click.option(
    "--prune",
    is_flag=True,
    help="also remove airlock-* roles and policies of agents no longer in the registry",
)
@click.option("--json", "as_json", is_flag=True)
def vault_setup(prune: bool, as_json: bool) -> None:
    """Create or update policies, token roles, the JWT signing key and database roles."""
    from orchestrator.vault.adapter import Vault
    from orchestrator.vault.setup import setup

    settings = config.load()
    report = setup(
        Vault(settings.vault_addr, settings.vault_token),
        load_registry(settings.agents_dir),
        settings.postgres_url,
        settings.credential_grace_s,
        settings.vault_token_period_s,
        prune=prune,
    )
    if as_json:
        emit_json(report.__dict__)
        return
    for line in report.changed:
        click.echo(f"  set     {line}")
    for line in report.removed:
        click.echo(f"  removed {line}")
    click.echo(
        f"vault: {len(report.changed)} changed, {len(report.unchanged)} already right, "
        f"{len(report.removed)} removed"
    )


@main.command()
@click.option(
    "--serve", "serve", metavar="HOST:PORT", help="serve it over HTTP at /.well-known/jwks.json"
)
def jwks(serve: str | None) -> None:
    """Print (or serve) the JWKS that verifies task JWTs."""
    from orchestrator.credentials import Credentials
    from orchestrator.identity import JwksServer
    from orchestrator.store import Store

    settings = config.load()
    credentials = Credentials(settings, Store(settings.redis_url, settings.namespace))
    if not serve:
        emit_json(credentials.jwks())
        return
    host, _, port = serve.rpartition(":")
    server = JwksServer(credentials.jwks, host or "127.0.0.1", int(port))
    click.echo(f"serving {server.url}", err=True)
    server.serve_forever()


@main.group(invoke_without_command=True)
@click.option("--task", "task_id", help="only this task's records")
@click.option("--denied", is_flag=True, help="only denied requests")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit(ctx: click.Context, task_id: str | None, denied: bool, as_json: bool) -> None:
    """Every egress decision, allowed and denied, with who asked."""
    if ctx.invoked_subcommand is not None:
        return
    from orchestrator.egress.audit import AuditLog
    from orchestrator.store import Store

    settings = config.load()
    records = AuditLog(Store(settings.redis_url, settings.namespace)).records(task_id, denied)
    if as_json:
        emit_json(records)
    else:
        render.audit_table(records)


@audit.command("verify")
def audit_verify() -> None:
    """Recompute the hash chains; exit 1 if a record was changed or removed."""
    from orchestrator.egress.audit import AuditLog
    from orchestrator.store import Store

    settings = config.load()
    count, problems = AuditLog(Store(settings.redis_url, settings.namespace)).verify()
    for problem in problems:
        click.echo(f"{problem.entry} (chain {problem.chain}): {problem.what}", err=True)
    click.echo(f"{count} records checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


@main.command()
def gateway() -> None:
    """Serve every task endpoint of this host (workers run with AIRLOCK_GATEWAY=remote)."""
    from dataclasses import replace

    from orchestrator import logs, telemetry
    from orchestrator.credentials import Credentials
    from orchestrator.gateway import CONTROL_SOCKET, GatewayService, LocalGateway
    from orchestrator.store import Store

    settings = replace(config.load(), gateway="local")
    logs.configure("INFO", settings.log_format)
    telemetry.setup(settings, "gateway")
    credentials = Credentials(settings, Store(settings.redis_url, settings.namespace))
    assert isinstance(credentials.endpoints, LocalGateway)
    service = GatewayService(credentials.endpoints, settings.endpoint_dir / CONTROL_SOCKET)
    click.echo(f"airlock gateway: control socket {service.control}", err=True)
    service.serve_forever()


@main.command("trace")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
def trace_command(task_id: str, as_json: bool) -> None:
    """The task's life as one trace: every phase and egress decision, as a waterfall."""
    spans = Client().trace(task_id)
    if not spans:
        fail(f"no spans stored for task {task_id} (traces go to OTLP when it is configured)", 1)
    emit_json(spans) if as_json else render.waterfall(spans)


@main.command()
@click.option("--limit", type=click.IntRange(1, 500), default=30, show_default=True)
@click.option("--once", is_flag=True, help="print the view once and exit")
@click.option("--json", "as_json", is_flag=True, help="one JSON snapshot (implies --once)")
def watch(limit: int, once: bool, as_json: bool) -> None:
    """A live view of runners: state, agent, age, egress allowed/denied, last event."""
    client = Client()
    if as_json:
        emit_json(client.runners(limit))
        return
    if once:
        render.out.print(render.runners_table(client.runners(limit)))
        return
    render.watch(client, limit)
