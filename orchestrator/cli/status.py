"""`airlock status`: the command people run most, so it loads the least (no rich)."""

from __future__ import annotations

import click

from orchestrator.cli import plain
from orchestrator.cli.app import emit_json, json_option
from orchestrator.cli.complete import task_ids
from orchestrator.cli.connect import connect


@click.command()
@click.argument("task_id", shell_complete=task_ids)
@json_option
def status(task_id: str, as_json: bool) -> None:
    """Show a task's state, reason, exit code and output."""
    result = connect().status(task_id)
    emit_json(result) if as_json else plain.status(result).write()
