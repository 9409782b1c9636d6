"""The operator's commands of `airlock`: registry, policy, Vault, gateway, audit, tracing.

Like the rest of the CLI they parse, delegate and render, nothing more.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from orchestrator import config, render
from orchestrator.cli import emit_json, fail, main
from orchestrator.client import Client
from orchestrator.errors import AirlockError
from orchestrator.policy.agents import load_registry
from orchestrator.policy.engine import PolicyEngine, load_bundle
from orchestrator.policy.testing import run_policy_tests
from orchestrator.spec import load_file


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
    store = Store(settings.redis_url, settings.namespace)
    credentials = Credentials(settings, store, ride_out_s=15)  # rides out a Vault restart
    assert isinstance(credentials.endpoints, LocalGateway)
    service = GatewayService(credentials.endpoints, settings.endpoint_dir / CONTROL_SOCKET)
    # Stopped as a service is stopped (SIGTERM): close every endpoint and the control socket.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
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


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Check Docker, Redis, Vault and its setup, the gateway, the policy bundle, the runner
    image and clock skew; say how to fix what is wrong (exit 1 if anything is)."""
    from orchestrator.doctor import Doctor

    findings = Doctor(config.load()).run()
    if as_json:
        emit_json([f.to_json() for f in findings])
    else:
        render.findings(findings)
    sys.exit(0 if all(f.ok for f in findings) else 1)
