"""The front door: serve the HTTP API, log the CLI in, and the local stack's callers."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator import config, wiring
from orchestrator.cli.app import emit_json, fail, json_option
from orchestrator.config import gvisor_queue


@click.command()
@click.option("--listen", metavar="HOST:PORT", help="default: AIRLOCK_API_LISTEN or 127.0.0.1:8600")
@click.option("--loglevel", default="WARNING", show_default=True)
def serve(listen: str | None, loglevel: str) -> None:
    """Serve the HTTP API: the front door for the CLI and upstream systems."""
    # Lazy on purpose: FastAPI and uvicorn load only for the server.
    from orchestrator.api.serve import serve as run

    settings = config.load(component="api")
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
    """Print a fresh token for a local user (alice, mallory, oncall) or service (ci-bot)."""
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


@dev.command("redis-users")
@click.argument("secrets", type=click.Path(file_okay=False, path_type=Path))
@click.option("--url", default="redis://127.0.0.1:6379/0", show_default=True)
def redis_users(secrets: Path, url: str) -> None:
    """Give each component its own Redis user (passwords in SECRETS/<component>.password)
    and switch password-less access off (idempotent); prints the admin user's URL."""
    import redis

    from orchestrator.adapters import redis_acl

    settings = config.load()
    passwords = {
        component: (secrets / f"{component}.password").read_text().strip()
        for component in ("admin", *redis_acl.COMPONENTS)
    }
    admin_name = redis_acl.user_name("admin")
    host = redis.Redis.from_url(url, decode_responses=True)
    admin = redis.Redis.from_url(
        url, username=admin_name, password=passwords["admin"], decode_responses=True
    )
    try:
        admin.ping()
    except redis.exceptions.AuthenticationError:  # the first time: no users yet
        admin = host
    queues = [settings.queue, gvisor_queue(settings)]
    redis_acl.apply(admin, passwords, settings.namespace, queues)
    redis_acl.lock_default(admin)
    saved = redis_acl.save(admin)
    click.echo(
        f"users {', '.join(redis_acl.user_name(c) for c in passwords)}"
        f"{'' if saved else ' (not saved: this server has no ACL file)'}",
        err=True,
    )


@dev.command("approles")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--given",
    is_flag=True,
    help="Register the credentials already in DIRECTORY (role_id, secret_id*) instead.",
)
def approles(directory: Path, given: bool) -> None:
    """Write each part of Airlock's Vault AppRole credentials (role_id, a fresh secret_id)
    to DIRECTORY/<component>/, 0600 (after `airlock vault setup`). With --given, the
    credentials a deployment generated (DIRECTORY/<component>/role_id and one secret_id*
    file per host) are registered in Vault instead."""
    import os

    from orchestrator.adapters.vault.setup import (
        COMPONENT_POLICIES,
        component_credentials,
        register_component_credentials,
    )

    vault = wiring.vault(config.load())
    for component in COMPONENT_POLICIES:
        home = directory / component
        if given:
            if not (home / "role_id").is_file():
                continue
            secret_ids = [f.read_text().strip() for f in sorted(home.glob("secret_id*"))]
            role_id = (home / "role_id").read_text().strip()
            new = register_component_credentials(vault, component, role_id, secret_ids)
            click.echo(f"{component}: role id and {new} new secret id(s) registered", err=True)
            continue
        role_id, secret_id = component_credentials(vault, component)
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        for name, value in (("role_id", role_id), ("secret_id", secret_id)):
            path = home / name
            path.touch(mode=0o600)
            os.chmod(path, 0o600)
            path.write_text(value + "\n")
    if not given:
        click.echo(
            f"AppRole credentials of {', '.join(COMPONENT_POLICIES)} in {directory}", err=True
        )


@dev.command("upstreams")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--prepare",
    is_flag=True,
    help="make the certificates, the forge token (also the coder's git token in Vault KV) "
    "and the demo repository, then exit",
)
def upstreams(directory: Path, prepare: bool) -> None:
    """Serve the local stack's upstreams (a reference site, a package index, a git forge
    and an MCP server, over HTTPS on loopback), keeping their state in DIRECTORY."""
    from orchestrator.local import upstreams as local  # the servers' imports, only here

    layout = local.Layout(directory)
    if not prepare:
        local.serve(layout)
        return
    local.ensure_certificates(layout)
    token = local.ensure_forge_token(layout)
    local.ensure_repository(layout)
    vault = wiring.vault(config.load())
    vault.write(local.FORGE_SECRET, {"data": {"token": token}})
    click.echo(
        f"certificates, forge token ({local.FORGE_SECRET}) and repository in {directory}", err=True
    )
