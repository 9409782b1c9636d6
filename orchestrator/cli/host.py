"""The worker host's commands: worker, beat, gateway, gc, vault setup, jwks, doctor."""

from __future__ import annotations

import signal
import sys

import click

from orchestrator import config, wiring
from orchestrator.adapters import logs
from orchestrator.adapters.vault.identity import JwksServer, transit_jwks
from orchestrator.adapters.vault.setup import setup
from orchestrator.cli import render
from orchestrator.cli.app import emit_json, json_option
from orchestrator.cli.doctor import Doctor
from orchestrator.policy.agents import load_registry
from orchestrator.worker import reap_now, run_beat, run_worker


@click.command()
@click.option("--queue", "-Q", "queues", multiple=True, help="queue to serve (repeatable)")
@click.option("--concurrency", "-c", type=click.IntRange(1, 256), help="tasks at once")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--beat/--no-beat",
    default=True,
    show_default=True,
    help="also run the periodic reaper (off where `airlock beat` runs)",
)
def worker(queues: tuple[str, ...], concurrency: int | None, loglevel: str, beat: bool) -> None:
    """Run a worker that executes tasks from the queue."""
    run_worker(config.load(component="worker"), list(queues) or None, concurrency, loglevel, beat)


@click.command()
@click.option("--loglevel", default="INFO", show_default=True)
def beat(loglevel: str) -> None:
    """Run the periodic scheduler alone (the reaper), for workers started with --no-beat."""
    run_beat(config.load(component="worker"), loglevel)


@click.command()
def gateway() -> None:
    """Serve every task endpoint of this host (workers run with AIRLOCK_GATEWAY=remote)."""
    settings = config.load(component="gateway")
    logs.configure("INFO", settings.log_format)
    service = wiring.gateway_service(settings)
    # Stopped as a service is stopped (SIGTERM): close every endpoint and the control socket.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    click.echo(f"airlock gateway: control socket {service.control}", err=True)
    service.serve_forever()


@click.command()
@click.option("--dry-run", is_flag=True, help="only say what would be removed")
@json_option
def gc(dry_run: bool, as_json: bool) -> None:
    """Remove containers, credentials and endpoints no live task owns."""
    found = reap_now(wiring.executor(config.load()), dry_run=dry_run)
    if as_json:
        emit_json([item.to_json() for item in found])
        return
    verb = "would remove" if dry_run else "removed"
    for item in found:
        click.echo(f"{verb} {item.kind} {item.id[:24]} (task {item.task_id}): {item.why}")
    click.echo(f"{len(found)} orphaned item(s)")


@click.group()
def vault() -> None:
    """Vault (or OpenBao) configuration for the agent registry."""


@vault.command("setup")
@click.option(
    "--prune",
    is_flag=True,
    help="also remove airlock-* roles and policies of agents no longer in the registry",
)
@json_option
def vault_setup(prune: bool, as_json: bool) -> None:
    """Create or update policies, token roles, the JWT signing key and database roles."""
    settings = config.load()
    report = setup(
        wiring.vault(settings),
        load_registry(settings.agents_dir),
        settings.postgres_url,
        settings.credential_grace_s,
        settings.vault_token_period_s,
        prune=prune,
        ticket_public_key=settings.ticket_public_key,
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


@click.command()
@click.option(
    "--serve", "serve", metavar="HOST:PORT", help="serve it over HTTP at /.well-known/jwks.json"
)
def jwks(serve: str | None) -> None:
    """Print (or serve) the JWKS that verifies task JWTs."""
    client = wiring.vault(config.load())
    if not serve:
        emit_json(transit_jwks(client))
        return
    host, _, port = serve.rpartition(":")
    server = JwksServer(lambda: transit_jwks(client), host or "127.0.0.1", int(port))
    click.echo(f"serving {server.url}", err=True)
    server.serve_forever()


@click.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check Docker, Redis, Vault and its setup, the gateway, the policy bundle, the runner
    image and clock skew; say how to fix what is wrong (exit 1 if anything is)."""
    findings = Doctor(config.load()).run()
    if as_json:
        emit_json([f.to_json() for f in findings])
    else:
        render.findings(findings)
    sys.exit(0 if all(f.ok for f in findings) else 1)
