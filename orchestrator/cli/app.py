"""The `airlock` group: its command table, the error and exit-code rules, and JSON output.

Commands are loaded only when run: each lives in a module of this package that imports what
its work needs, and `airlock --help` lists them from the table below without loading any.

Exit codes: 0 succeeded; for `submit --wait`, the task's own exit code when its command ran
to an exit, 1 failed without one or cancelled, 124 timed out, 130 interrupted; 2 invalid
input or rejected (by the task policy or the front door's); 3 a required service is
unreachable; 4 not authenticated (no token, or one the API refused).
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any, NoReturn

import click

from orchestrator.errors import AirlockError, InvalidSpec, PolicyError

# name -> (module in this package, attribute, one line of help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "submit": ("submit", "submit", "Submit a task: airlock submit [OPTIONS] -- CMD ARGS..."),
    "status": ("status", "status", "Show a task's state, reason, exit code and output."),
    "logs": ("tasks", "logs", "Print a task's stdout and stderr."),
    "list": ("tasks", "list_tasks", "List recent tasks, newest first."),
    "cancel": ("tasks", "cancel", "Cancel a task."),
    "output": ("tasks", "output", "Fetch the files a task left in /workspace/output."),
    "spec": ("submit", "spec", "The task spec contract."),
    "trace": ("watching", "trace_command", "A task's life as one trace, as a waterfall."),
    "watch": ("watching", "watch", "A live view of runners."),
    "audit": ("watching", "audit", "Every egress decision, allowed and denied, with who asked."),
    "agents": ("policy", "agents", "The agent registry: one identity and ceiling per role."),
    "policy": ("policy", "policy", "The Rego policy bundle."),
    "worker": ("host", "worker", "Run a worker that executes tasks from the queue."),
    "beat": ("host", "beat", "Run the periodic scheduler alone (the reaper)."),
    "gateway": ("host", "gateway", "Serve every task endpoint of this host."),
    "gc": ("host", "gc", "Remove containers, credentials and endpoints no live task owns."),
    "vault": ("host", "vault", "Vault (or OpenBao) configuration for the agent registry."),
    "jwks": ("host", "jwks", "Print (or serve) the JWKS that verifies task JWTs."),
    "doctor": ("host", "doctor", "Check the services, the setup and the policy bundle."),
    "serve": ("front", "serve", "Serve the HTTP API: the front door for the CLI and upstreams."),
    "login": ("front", "login", "Store a bearer token for the CLI (0600)."),
    "dev": ("front", "dev", "The local stack's callers: the OIDC issuer and their tokens."),
    "image": ("image", "image", "Task images of your own, checked against the runner contract."),
}


class AirlockGroup(click.Group):
    """Loads a command when it runs; turns Airlock's errors into one readable line (or a
    JSON object under --json) and the documented exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        command: click.Command = getattr(
            importlib.import_module(f"orchestrator.cli.{module}"), attribute
        )
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help) for name, (_, _, help) in COMMANDS.items()])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AirlockError as exc:
            fail(str(exc), exc.exit_code, _problems(exc))


def _problems(exc: AirlockError) -> list[str]:
    return list(exc.problems) if isinstance(exc, (InvalidSpec, PolicyError)) else []


def json_option(command: Any) -> Any:
    """--json: machine-readable output, errors included (as {"error": ...})."""

    def remember(ctx: click.Context, _: click.Parameter, value: bool) -> bool:
        ctx.meta["airlock.json"] = value
        return value

    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        expose_value=True,
        callback=remember,
        help="machine-readable output",
    )(command)


def fail(message: str, code: int, problems: list[str] | None = None) -> NoReturn:
    """One readable line on stderr (or a JSON error on stdout under --json), then exit."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("airlock.json"):
        error: dict[str, Any] = {"message": message, "exit_code": code}
        if problems:
            error["problems"] = problems
        emit_json({"error": error})
    else:
        click.echo(f"airlock: {message}", err=True)
    sys.exit(code)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group(
    cls=AirlockGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog='Shell completion: eval "$(_AIRLOCK_COMPLETE=bash_source airlock)" '
    "(zsh_source, fish_source for those shells); task ids and agent names complete too.",
)
@click.version_option(package_name="airlock", prog_name="airlock", message="%(prog)s %(version)s")
def main() -> None:
    """Airlock: sealed, ephemeral runners for AI-agent tasks."""
