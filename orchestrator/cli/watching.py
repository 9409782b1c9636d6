"""What ops watch: a task's trace, the live runners, and the egress audit."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator import config, wiring
from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.adapters.gateway.ocsf import RotatingSink, to_ocsf
from orchestrator.cli import render
from orchestrator.cli.app import emit_json, fail, json_option
from orchestrator.cli.complete import task_ids
from orchestrator.cli.connect import connect


def _audit_log() -> AuditLog:
    settings = config.load()
    return wiring.audit_log(settings, wiring.store(settings))


@click.group(invoke_without_command=True)
@click.option("--task", "task_id", help="only this task's records", shell_complete=task_ids)
@click.option("--denied", is_flag=True, help="only denied requests")
@json_option
@click.pass_context
def audit(ctx: click.Context, task_id: str | None, denied: bool, as_json: bool) -> None:
    """Every egress decision, allowed and denied, with who asked."""
    if ctx.invoked_subcommand is not None:
        return
    client = connect()
    if hasattr(client, "audit"):
        records = client.audit(task_id, denied)
    else:
        records = _audit_log().records(task_id, denied)
    if as_json:
        emit_json(records)
    else:
        render.audit_table(records, one_task=task_id is not None)


@audit.command("verify")
@json_option
def audit_verify(as_json: bool) -> None:
    """Recompute the hash chains and hold them against their signed anchors (Redis and this
    host's anchor file); exit 1 if a record or chain was changed, removed or deleted."""
    count, problems = _audit_log().verify()
    if as_json:
        emit_json({"checked": count, "problems": [p.__dict__ for p in problems]})
    else:
        for problem in problems:
            click.echo(f"{problem.entry} (chain {problem.chain}): {problem.what}", err=True)
        click.echo(f"{count} records checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["ocsf"]), default="ocsf", show_default=True)
@click.option("--follow", "-f", is_flag=True, help="keep writing records as they are made")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write to this file, rotated by size (default: standard output)",
)
@click.option("--rotate-mb", type=click.IntRange(1, 10240), default=100, show_default=True)
@click.option("--keep", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--after", default="0", help="start after this stream id (default: the start)")
def audit_export(
    fmt: str, follow: bool, output: Path | None, rotate_mb: int, keep: int, after: str
) -> None:
    """Every egress decision as OCSF JSON lines (HTTP Activity, and API Activity for MCP),
    with identities and trace ids, for a SIEM; --follow streams new ones within a second."""
    log = _audit_log()
    sink = RotatingSink(output, rotate_mb << 20, keep) if output else None
    written = 0
    try:
        for _, record in log.follow(after, forever=follow):
            event = to_ocsf(record)
            if sink is not None:
                sink.write(event)
            else:
                render.json_line(event)
            written += 1
    except KeyboardInterrupt:
        pass
    finally:
        if sink is not None:
            sink.close()
            click.echo(f"{written} {fmt} events written to {output}", err=True)


@click.command("trace")
@click.argument("task_id", shell_complete=task_ids)
@json_option
def trace_command(task_id: str, as_json: bool) -> None:
    """The task's life as one trace: every phase and egress decision, as a waterfall."""
    spans = connect().trace(task_id)
    if not spans:
        fail(f"no spans stored for task {task_id} (traces go to OTLP when it is configured)", 1)
    emit_json(spans) if as_json else render.waterfall(spans)


@click.command()
@click.option("--limit", type=click.IntRange(1, 500), default=30, show_default=True)
@click.option("--once", is_flag=True, help="print the view once and exit")
@json_option
def watch(limit: int, once: bool, as_json: bool) -> None:
    """A live view of runners: state, agent, age, egress allowed/denied, last event
    (--json: one snapshot)."""
    client = connect()
    if as_json:
        emit_json(client.runners(limit))
        return
    if once:
        render.out.print(render.runners_table(client.runners(limit)))
        return
    render.watch(client, limit)
