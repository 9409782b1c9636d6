"""Shell completion of task ids and agent names (click's completion protocol)."""

from __future__ import annotations

import click
from click.shell_completion import CompletionItem

from orchestrator import config
from orchestrator.cli.connect import connect
from orchestrator.errors import AirlockError


def task_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Recent task ids that start with what was typed, with their state."""
    try:
        tasks = connect().tasks(limit=200)
    except AirlockError:
        return []
    return [
        CompletionItem(task["id"], help=f"{task['state']} {task.get('agent') or ''}")
        for task in tasks
        if task["id"].startswith(incomplete)
    ]


def agent_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Agent roles of the registry (one YAML file each) that start with what was typed."""
    try:
        directory = config.load().agents_dir
        names = sorted({p.stem for p in directory.glob("*.y*ml")})
    except (AirlockError, OSError):
        return []
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]
