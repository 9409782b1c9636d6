"""How a task ends: its terminal state and reason, decided from how its run stopped, and the
exit code a waiting command returns for it. Pure rules, one table each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from orchestrator.core.lifecycle import TaskState

S = TaskState


class Ending(str, Enum):
    """How the run stopped, as the executor saw it."""

    EXITED = "exited"  # the command exited (its status says how)
    TIMED_OUT = "timed_out"  # the deadline came first; the container was killed
    CANCELLED = "cancelled"  # someone cancelled it while it ran
    CANCELLED_EARLY = "cancelled_early"  # someone cancelled it before the command started
    ERROR = "error"  # Airlock could not carry it (a service refused or was away)
    INTERNAL = "internal"  # a bug in Airlock
    LOST = "lost"  # nothing decided: the worker stopped before the task finished


@dataclass(frozen=True)
class Facts:
    """What the executor knows when the run stops; each ending reads only its own."""

    exit_code: int | None = None
    oom_killed: bool = False
    memory_limit: int = 0
    timeout_s: int = 0
    cancelled_by: str = "unknown"
    error: str = ""


def _exited(f: Facts) -> tuple[TaskState, str]:
    if f.oom_killed:
        return S.FAILED, f"out of memory (limit {f.memory_limit >> 20} MiB)"
    code = -1 if f.exit_code is None else f.exit_code
    return (S.SUCCEEDED if code == 0 else S.FAILED), f"exit code {code}"


RULES: dict[Ending, Callable[[Facts], tuple[TaskState, str]]] = {
    Ending.EXITED: _exited,
    Ending.TIMED_OUT: lambda f: (
        S.TIMED_OUT,
        f"deadline of {f.timeout_s}s reached; container killed",
    ),
    Ending.CANCELLED: lambda f: (S.CANCELLED, f"cancelled by {f.cancelled_by}"),
    Ending.CANCELLED_EARLY: lambda f: (
        S.CANCELLED,
        f"cancelled by {f.cancelled_by} before it started",
    ),
    Ending.ERROR: lambda f: (S.FAILED, f"error: {f.error}"),
    Ending.INTERNAL: lambda f: (S.FAILED, f"internal error: {f.error}"),
    Ending.LOST: lambda f: (S.FAILED, "worker stopped before the task finished"),
}


def decide(ending: Ending, facts: Facts = Facts()) -> tuple[TaskState, str]:
    """The terminal state and reason of a task whose run stopped this way."""
    return RULES[ending](facts)


# The exit code of `airlock submit --wait` (like `docker run`, and `timeout` for a deadline).
EXIT_REJECTED = 2
EXIT_TIMED_OUT = 124
EXIT_INTERRUPTED = 130  # the waiting command itself got Ctrl-C


def exit_code(state: str, task_exit_code: int | None) -> int:
    """What a command waiting for a task exits with, once the task has ended: the task's own
    exit code when its command ran to an exit, else by how it ended."""
    if state == S.SUCCEEDED.value:
        return 0
    if state == S.REJECTED.value:
        return EXIT_REJECTED
    if state == S.TIMED_OUT.value:
        return EXIT_TIMED_OUT
    if state == S.FAILED.value and task_exit_code is not None and 0 < task_exit_code < 256:
        return task_exit_code
    return 1
