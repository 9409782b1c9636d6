"""How the CLI shows tasks to people. Machines get `--json` instead and never see this."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from orchestrator.cli.plain import STATE_STYLE, UNWRAPPED, unwrapped, visible
from orchestrator.core.lifecycle import TaskState
from orchestrator.core.waterfall import across_hosts
from orchestrator.core.waterfall import rows as waterfall_rows

if TYPE_CHECKING:
    from rich.status import Status

    from orchestrator.core.agent import Agent
    from orchestrator.core.grant import Grant
    from orchestrator.core.lifecycle import Event


def _console(stderr: bool = False) -> Console:
    """Rich finds a terminal's width (or takes COLUMNS); piped, a table's rows stay whole."""
    piped = unwrapped(sys.stderr if stderr else sys.stdout)
    return Console(
        stderr=stderr, highlight=False, soft_wrap=True, width=UNWRAPPED if piped else None
    )


out = _console()
err = _console(stderr=True)


def escape(text: str) -> str:
    """Text a task or a caller controls, for rich: markup escaped and control characters
    made visible, so neither reaches the terminal as such."""
    return escape_markup(visible(text))


def styled_state(state: str) -> str:
    style = STATE_STYLE.get(state, "dim")
    return f"[{style}]{state}[/{style}]"


def duration(status: dict[str, Any]) -> str:
    start, end = status.get("created_at"), status.get("finished_at")
    if not start or not end:
        return ""
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return f"{seconds:.2f}s"


def summary(status: dict[str, Any]) -> None:
    took = duration(status)
    out.print(
        f"task {status['id']} {styled_state(status['state'])}: {escape(status['reason'])}"
        + (f" ({took})" if took else "")
    )
    for item in status.get("output") or []:
        note = " (truncated)" if item["truncated"] else ""
        out.print(f"  output: {escape(item['name'])}  {item['size']} bytes{note}")


def task_list(tasks: list[dict[str, Any]]) -> None:
    table = Table(box=None, header_style="bold")
    # Ids are never shortened (they are copied into the next command); the reason folds.
    table.add_column("ID", no_wrap=True, min_width=36)
    table.add_column("STATE", no_wrap=True)
    table.add_column("AGENT", max_width=16, overflow="ellipsis")
    table.add_column("CREATED", no_wrap=True)
    table.add_column("REASON", overflow="fold", min_width=16, ratio=1)
    for task in tasks:
        table.add_row(
            task["id"],
            styled_state(task["state"]),
            escape(task["agent"] or ""),
            (task["created_at"] or "")[5:16].replace("T", " "),
            escape(task["reason"]),
        )
    out.print(table)


def agent_table(agents: list[Agent]) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("AGENT", "OWNER", "ISOLATION", "MAX TIMEOUT", "EGRESS", "TOOLS", "SECRETS"):
        table.add_column(column)
    for agent in agents:
        tools = sum(len(server.tools) for server in agent.mcp)
        table.add_row(
            agent.name,
            agent.owner,
            agent.isolation,
            f"{agent.max_timeout_s}s",
            str(len(agent.egress)),
            str(tools),
            str(len(agent.secrets)),
        )
    out.print(table)


def reach(grant: Grant, on_request: dict[str, list[Any]], policy_version: str) -> None:
    """What a grant lets an agent reach, rule by rule (`airlock policy explain`)."""
    out.print(
        f"[bold]{escape(grant.agent)}[/bold] as {escape(grant.identity)} "
        f"(policy {policy_version[:23]})"
    )
    out.print(f"  image {escape(grant.image)}, runtime {grant.runtime}, timeout {grant.timeout_s}s")
    table = Table(box=None, header_style="bold", title="egress", title_justify="left")
    for column in ("RULE", "HOST", "PORTS", "METHODS", "PATHS", "NOTES"):
        table.add_column(column, overflow="fold")
    for index, rule in enumerate(grant.egress):
        notes = [
            rule.scheme if rule.scheme == "http" else f"https ({rule.tls})",
            *(["internal"] if rule.internal else []),
            *(["tls upstream"] if rule.upstream_tls else []),
            *([f"injects {rule.inject.name}"] if rule.inject else []),
            *(["[yellow]report only[/yellow]"] if not rule.enforce else []),
        ]
        table.add_row(
            escape(rule.name or f"egress[{index}] {rule.host}"),
            escape(rule.host),
            ",".join(map(str, rule.ports)),
            ",".join(rule.methods),
            escape(",".join(rule.paths) or "any"),
            ", ".join(notes),
        )
    out.print(table if grant.egress else "  egress: none (every request is denied)")
    for tool in grant.tools:
        rules = "; ".join(
            f"{name} {constraint.model_dump(exclude_none=True)}"
            for name, constraint in tool.args.items()
        )
        out.print(
            f"  tool {escape(tool.server)}/{escape(tool.tool)} at {escape(tool.url)}"
            + (f" ({escape(rules)})" if rules else "")
        )
    for secret in grant.secrets:
        out.print(f"  secret {escape(secret.name)} ({secret.kind})")
    asked = [f"{len(v)} {k}" for k, v in on_request.items() if v]
    if asked:
        out.print(f"  on request (task scopes): {', '.join(asked)}")


def audit_table(records: list[dict[str, Any]], one_task: bool = False) -> None:
    """Egress decisions; for one task's, without the task and agent columns."""
    table = Table(box=None, header_style="bold")
    # Short columns never wrap; the long ones share what the terminal's width leaves.
    short = (
        ("TIME", "DECISION", "METHOD")
        if one_task
        else ("TIME", "TASK", "AGENT", "DECISION", "METHOD")
    )
    for column in short:
        table.add_column(column, no_wrap=True)
    table.add_column("TARGET", overflow="fold", ratio=3)
    table.add_column("RULE", overflow="fold", max_width=24)
    table.add_column("REASON", overflow="fold", ratio=2)
    for r in records:
        when = datetime.fromtimestamp(r.get("time", 0)).strftime("%H:%M:%S")
        decision = "[green]allow[/green]" if r.get("decision") == "allow" else "[red]deny[/red]"
        target = f"{r.get('host')}:{r.get('port')}{r.get('path') or ''}"
        if r.get("tool"):
            target += f" tool {r['tool']}"
        reason = str(r.get("reason", ""))
        if r.get("injected"):
            reason += f"; {r['injected']} added by the gateway"
        row = [when] + (
            [] if one_task else [str(r.get("task", ""))[:8], escape(str(r.get("agent", "")))]
        )
        table.add_row(
            *row,
            decision,
            escape(str(r.get("method", ""))),
            escape(target),
            escape(str(r.get("rule", ""))),
            escape(reason),
        )
    out.print(table)


def waterfall(spans: list[dict[str, Any]], width: int | None = None) -> None:
    """Spans as an indented tree with bars on one time axis; failures and denials in red.
    The axis takes a third of the terminal's width."""
    width = width or max(16, min(60, out.width // 3))
    found = waterfall_rows(spans)
    hosts = across_hosts(found)  # a HOST column when the trace crosses machines
    table = Table(box=None, header_style="bold")
    for column in ("SPAN", *(["HOST"] if hosts else []), "TIMELINE", "MS", "DETAIL"):
        table.add_column(column, no_wrap=column != "DETAIL")
    for row in found:
        style = "red" if row.error else "cyan"
        length = max(int(row.length * width), 1)
        bar = " " * int(row.begin * width) + f"[{style}]" + "█" * length + f"[/{style}]"
        label = escape(row.name)
        name = ("  " * row.depth) + (f"[red]{label}[/red]" if row.error else label)
        host = [escape(row.host)] if hosts else []
        table.add_row(name, *host, bar, f"{row.ms:.1f}", escape(row.detail))
    out.print(table)


def _age(task: dict[str, Any]) -> str:
    start = datetime.fromisoformat(task["created_at"]).timestamp() if task.get("created_at") else 0
    end = (
        datetime.fromisoformat(task["finished_at"]).timestamp()
        if task.get("finished_at")
        else time.time()
    )
    seconds = max(end - start, 0)
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def runners_table(
    tasks: list[dict[str, Any]],
    last: dict[str, str] | None = None,
    warm: dict[str, dict[str, Any]] | None = None,
) -> Table:
    """Task runners, and the warm ones waiting for a task (`warm`: the pool's members)."""
    table = Table(box=None, header_style="bold", title="airlock runners")
    for column in ("TASK", "STATE", "AGENT", "AGE", "EGRESS", "LAST EVENT"):
        if column == "AGENT":  # a name a raw producer made up must not crowd out the events
            table.add_column(column, no_wrap=True, max_width=16, overflow="ellipsis")
        else:
            table.add_column(column, no_wrap=column != "LAST EVENT", overflow="fold")
    for member, info in sorted((warm or {}).items(), key=lambda m: m[1].get("since", 0)):
        age = {"created_at": datetime.fromtimestamp(float(info.get("since", 0))).isoformat()}
        table.add_row(
            member[:13],  # pool-<8 hex>, as wide as the task ids beside it allow
            "[cyan]warm[/cyan]",
            "",
            _age(age),
            "-",
            escape(f"ready: {info.get('image')} ({info.get('runtime')})"),
        )
    for task in tasks:
        denied = task.get("egress_denied", 0)
        egress = f"{task.get('egress_allowed', 0)} ok / " + (
            f"[red]{denied} denied[/red]" if denied else "0 denied"
        )
        event = (last or {}).get(task["id"]) or task.get("reason", "")
        table.add_row(
            task["id"][:8],
            styled_state(task["state"]),
            escape(task.get("agent") or ""),
            _age(task),
            egress,
            escape(event),
        )
    return table


def watch(client: Any, limit: int) -> None:
    """Redraw in place on every state change (and every second, for ages and counts).
    Through the API (no store at hand): every second, with each task's last reason."""
    store = getattr(client, "store", None)
    last: dict[str, str] = {}
    after = "$"

    def table() -> Table:
        runners = client.runners(limit)
        if store is None:
            last.update({r["id"]: f"{r['state']}: {r.get('reason', '')}" for r in runners})
        return runners_table(runners, last, store.pool_members() if store else {})

    from rich.live import Live  # lazy on purpose: only `watch` redraws

    with Live(table(), console=out, screen=False, auto_refresh=False) as live:
        try:
            while True:
                if store is None:
                    time.sleep(1)
                for event in store.all_events(after, block_ms=1000) if store else ():
                    after = event.id
                    last[event.task_id] = f"{event.state.value}: {event.reason}"
                live.update(table(), refresh=True)
        except KeyboardInterrupt:
            pass


def findings(items: list[Any]) -> None:
    for item in items:
        mark = "[green]ok[/green]     " if item.ok else "[red]PROBLEM[/red]"
        if item.ok and getattr(item, "warning", False):
            mark = "[bold yellow]WARNING[/bold yellow]"
        out.print(f"{mark} {item.check:<14} {escape(item.detail)}")
        if not item.ok or getattr(item, "warning", False):
            out.print(f"        {'':<14} fix: {item.fix}")


def json_line(data: dict[str, Any]) -> None:
    """One JSON object on its own line (a stream of them for machines to follow)."""
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


def write_log(stream: str, text: str) -> None:
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.write(text)
    target.flush()


class Progress:
    """Live progress of a waiting `submit`: a spinner on a terminal, lines otherwise."""

    def __init__(self, task_id: str, enabled: bool) -> None:
        self.task_id = task_id
        self.enabled = enabled
        self.started = time.monotonic()
        self.live = enabled and err.is_terminal
        self._status: Status | None = None

    def __enter__(self) -> Progress:
        if self.live:
            self._status = err.status(f"task {self.task_id}: pending")
            self._status.start()
        elif self.enabled:
            err.print(f"task {self.task_id}: pending")
        return self

    def event(self, event: Event) -> None:
        if not self.enabled or event.state is TaskState.PENDING:
            return
        line = (
            f"task {self.task_id}: {event.state.value} ({escape(event.reason)}) "
            f"+{time.monotonic() - self.started:.2f}s"
        )
        if self._status is not None:
            self._status.update(line)
        else:
            err.print(line)

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()
