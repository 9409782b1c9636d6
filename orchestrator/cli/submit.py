"""Submitting tasks, and the task spec contract: submit, spec schema, spec check."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.cli import render
from orchestrator.cli.app import emit_json, fail, json_option
from orchestrator.cli.complete import agent_names
from orchestrator.cli.connect import connect
from orchestrator.core.lifecycle import TaskState
from orchestrator.core.outcome import EXIT_INTERRUPTED, exit_code
from orchestrator.core.spec import json_schema, load_file, parse
from orchestrator.errors import InvalidSpec

ADMISSION_WAIT_S = 5.0


def pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidSpec([f"{option} {item!r}: expected KEY=VALUE"])
        result[key] = value
    return result


@click.command()
@click.option(
    "--file",
    "-f",
    "spec_file",
    type=click.Path(path_type=Path),
    help="task spec (JSON or YAML); flags override its fields",
)
@click.option("--agent", "-a", help="agent role the task runs as", shell_complete=agent_names)
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
@json_option
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
    """Submit a task: airlock submit [OPTIONS] -- CMD ARGS...

    With --wait, exits with the task's own exit code when its command ran (like docker
    run), 1 when it failed without one or was cancelled, 124 when it timed out, 2 when it
    was rejected, and 130 on Ctrl-C (the task keeps running).
    """
    spec = parse(_spec_data(spec_file, command, env, labels, flags))
    client = connect()
    task_id = client.submit(spec)
    if not wait:
        # A worker decides admission within milliseconds; say so now if it refused.
        status = client.wait_admission(task_id, ADMISSION_WAIT_S)
        emit_json({"id": task_id, "state": status["state"]}) if as_json else click.echo(task_id)
        if status["state"] == TaskState.REJECTED.value:
            fail(f"task {task_id} rejected: {status['reason']}", 2)
        return
    try:
        with render.Progress(task_id, enabled=not as_json) as progress:
            status = client.wait(task_id, on_event=progress.event)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; task {task_id} goes on (airlock cancel {task_id})", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        status["logs"] = "".join(text for _, text in client.logs(task_id))
        emit_json(status)
    else:
        for stream, text in client.logs(task_id):
            render.write_log(stream, text)
        render.summary(status)
    sys.exit(exit_code(status["state"], status.get("exit_code")))


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


@click.group()
def spec() -> None:
    """The task spec contract."""


@spec.command()
def schema() -> None:
    """Print the JSON Schema of the task spec."""
    emit_json(json_schema())


@spec.command()
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def check(path: Path, as_json: bool) -> None:
    """Validate a spec file without submitting it."""
    parsed = load_file(path)
    if as_json:
        emit_json({"path": str(path), "valid": True, "spec": parsed.model_dump(mode="json")})
    else:
        click.echo(f"{path}: valid")
