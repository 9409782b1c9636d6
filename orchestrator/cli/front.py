"""The front door: serve the HTTP API, log the CLI in, and the local stack's callers."""

from __future__ import annotations

import sys

import click

from orchestrator import config, wiring
from orchestrator.cli.app import emit_json, fail, json_option


@click.command()
@click.option("--listen", metavar="HOST:PORT", help="default: AIRLOCK_API_LISTEN or 127.0.0.1:8600")
@click.option("--loglevel", default="WARNING", show_default=True)
def serve(listen: str | None, loglevel: str) -> None:
    """Serve the HTTP API: the front door for the CLI and upstream systems."""
    # Lazy on purpose: FastAPI and uvicorn load only for the server.
    from orchestrator.api.serve import serve as run

    settings = config.load()
    address = listen or settings.api_listen
    click.echo(f"airlock api on http://{address} (issuer {settings.oidc_issuer})", err=True)
    run(settings, address, loglevel)


@click.command()
@click.option("--dev", "dev_caller", metavar="NAME", help="local stack: mint a token for NAME")
@json_option
def login(dev_caller: str | None, as_json: bool) -> None:
    """Store a bearer token for the CLI (0600): read from stdin, or minted for a local
    caller with --dev. AIRLOCK_TOKEN, when set, is used instead."""
    from orchestrator.remote import RemoteClient, store_token

    settings = config.load()
    if dev_caller:
        token = _dev_token(dev_caller)
    elif sys.stdin.isatty():
        token = click.prompt("token", hide_input=True).strip()
    else:
        token = sys.stdin.read().strip()
    if not token:
        fail("no token given", 2)
    who = None
    if settings.api_url:
        who = RemoteClient(settings.api_url, token).whoami()  # refuses a token that fails
    path = store_token(token)
    if as_json:
        emit_json({"path": str(path), "caller": who})
    else:
        name = f"{who['kind']}:{who['name']}" if who else "a caller (not checked: no API URL)"
        click.echo(f"logged in as {name}; token in {path}")


@click.group()
def dev() -> None:
    """The local stack's callers: OpenBao as the OIDC issuer, and tokens for its callers."""


def _dev_token(name: str) -> str:
    from orchestrator.adapters.vault.issuer import dev_token

    return dev_token(wiring.vault(config.load()), name)


@dev.command("token")
@click.argument("name")
def token(name: str) -> None:
    """Print a fresh token for a local user (alice, mallory) or service (ci-bot)."""
    click.echo(_dev_token(name))


@dev.command("issuer")
@json_option
def issuer(as_json: bool) -> None:
    """Make OpenBao the OIDC issuer of callers' tokens, with the local callers (idempotent)."""
    from orchestrator.adapters.vault.issuer import ensure_issuer

    settings = config.load()
    info = ensure_issuer(wiring.vault(settings), settings.oidc_audience)
    if as_json:
        emit_json({"issuer": info.url, "audience": info.audience})
    else:
        click.echo(info.url)
