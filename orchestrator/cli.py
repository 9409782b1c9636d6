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
@click.option(
    "--beat/--no-beat",
    default=True,
    show_default=True,
    help="also run the periodic reaper (off where `airlock beat` runs)",
)
def worker(queues: tuple[str, ...], concurrency: int | None, loglevel: str, beat: bool) -> None:
    """Run a worker that executes tasks from the queue."""
    from orchestrator.worker import run_worker

    run_worker(config.load(), list(queues) or None, concurrency, loglevel, beat)


@main.command()
@click.option("--loglevel", default="INFO", show_default=True)
def beat(loglevel: str) -> None:
    """Run the periodic scheduler alone (the reaper), for workers started with --no-beat."""
    from orchestrator.worker import run_beat

    run_beat(config.load(), loglevel)


# The operator's commands (agents, policy, vault, gateway, audit, trace, watch, gc).
from orchestrator import cli_ops  # noqa: E402, F401  (registers them on `main`)
