"""Reading and steering tasks: status, logs, list, cancel, output."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import click

from orchestrator.cli import render
from orchestrator.cli.app import emit_json, fail, json_option
from orchestrator.cli.complete import task_ids
from orchestrator.cli.connect import connect
from orchestrator.core.lifecycle import TaskState


@click.command()
@click.argument("task_id", shell_complete=task_ids)
@click.option("--follow", "-f", is_flag=True, help="keep printing until the task ends")
@json_option
def logs(task_id: str, follow: bool, as_json: bool) -> None:
    """Print a task's stdout and stderr (--json: one object per chunk and line)."""
    for stream, text in connect().logs(task_id, follow=follow):
        if as_json:
            render.json_line({"stream": stream, "text": text})
        else:
            render.write_log(stream, text)


@click.command("list")
@click.option("--state", type=click.Choice([s.value for s in TaskState]))
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@json_option
def list_tasks(state: str | None, limit: int, as_json: bool) -> None:
    """List recent tasks, newest first."""
    tasks = connect().tasks(state, limit)
    emit_json(tasks) if as_json else render.task_list(tasks)


@click.command()
@click.argument("task_id", shell_complete=task_ids)
@json_option
def cancel(task_id: str, as_json: bool) -> None:
    """Cancel a task: a running container is stopped, a pending task never starts."""
    result = connect().cancel(task_id)
    emit_json({"id": task_id, "result": result}) if as_json else click.echo(f"{task_id}: {result}")


@click.command()
@click.argument("task_id", shell_complete=task_ids)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="write every output file here (default: print the single file)",
)
@json_option
def output(task_id: str, directory: Path | None, as_json: bool) -> None:
    """Fetch the files a task left in /workspace/output."""
    files = connect().output(task_id)
    if directory is None and as_json:
        emit_json(
            [
                {"name": name, "size": len(data), "base64": base64.b64encode(data).decode()}
                for name, data in files
            ]
        )
        return
    if directory is None:
        if len(files) != 1:
            fail(f"task has {len(files)} output files; use --dir", 2)
        sys.stdout.buffer.write(files[0][1])
        return
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files:
        path = directory / Path(name).name
        path.write_bytes(data)
        written.append({"name": name, "size": len(data), "path": str(path)})
    if as_json:
        emit_json(written)
    else:
        for item in written:
            click.echo(item["path"])
