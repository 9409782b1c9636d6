"""`airlock image`: task images of your own, checked against the runner contract."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator import config
from orchestrator.adapters.runtime.images import BASES, build, check
from orchestrator.cli.app import emit_json, fail, json_option


@click.group()
def image() -> None:
    """Task images of your own, built on the runner or tools image."""


@image.command("build")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tag", "-t", required=True, help="the image name to build, NAME[:TAG]")
@click.option(
    "--from",
    "base",
    type=click.Choice(sorted(BASES)),
    default="runner",
    show_default=True,
    help="the base: the minimal runner image, the tools image (curl, git, pip, node, npm, "
    "MCP), or busybox (no Python, no libc)",
)
@json_option
def build_command(directory: Path, tag: str, base: str, as_json: bool) -> None:
    """Build DIRECTORY's Dockerfile (FROM ${AIRLOCK_BASE}) and check the runner contract:
    no entrypoint of its own, the task user, and a hardened run under the runner that
    completes."""
    quiet = as_json
    if not (directory / "Dockerfile").is_file():
        fail(f"{directory} has no Dockerfile", 1)
    if not quiet:
        click.echo(f"building {tag} on {BASES[base]} ...", err=True)

    def progress(line: str) -> None:
        if not quiet:
            click.echo(f"  {line}", err=True)

    build(directory, tag, BASES[base], progress)
    if not quiet:
        click.echo("checking the runner contract ...", err=True)
    found = check(tag, BASES[base], config.load().runner_dir)
    if not found.ok:
        if not as_json:
            for problem in found.problems:
                click.echo(f"  - {problem}", err=True)
        fail(f"{tag} does not meet the runner contract", 1, found.problems)
    if as_json:
        emit_json({"image": tag, "base": BASES[base], "ok": True})
    else:
        click.echo(f"{tag}: meets the runner contract; list it in an agent's images to use it")
