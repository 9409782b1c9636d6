"""How a task ends, and what a waiting command exits with: the pure rules, as tables."""

from __future__ import annotations

import pytest

from orchestrator.core.lifecycle import TERMINAL, TaskState
from orchestrator.core.outcome import RULES, Ending, Facts, decide, exit_code

S = TaskState
MiB = 1 << 20

ENDINGS = [
    (Ending.EXITED, Facts(exit_code=0), S.SUCCEEDED, "exit code 0"),
    (Ending.EXITED, Facts(exit_code=3), S.FAILED, "exit code 3"),
    (Ending.EXITED, Facts(exit_code=None), S.FAILED, "exit code -1"),
    (
        Ending.EXITED,
        Facts(exit_code=137, oom_killed=True, memory_limit=64 * MiB),
        S.FAILED,
        "out of memory (limit 64 MiB)",
    ),
    # an OOM kill wins over an exit code of 0 (the engine may report either)
    (
        Ending.EXITED,
        Facts(exit_code=0, oom_killed=True, memory_limit=MiB),
        S.FAILED,
        "out of memory (limit 1 MiB)",
    ),
    (Ending.TIMED_OUT, Facts(timeout_s=5), S.TIMED_OUT, "deadline of 5s reached; container killed"),
    (Ending.CANCELLED, Facts(cancelled_by="bob"), S.CANCELLED, "cancelled by bob"),
    (
        Ending.CANCELLED_EARLY,
        Facts(cancelled_by="bob"),
        S.CANCELLED,
        "cancelled by bob before it started",
    ),
    (Ending.ERROR, Facts(error="vault is unreachable"), S.FAILED, "error: vault is unreachable"),
    (Ending.INTERNAL, Facts(error="KeyError('x')"), S.FAILED, "internal error: KeyError('x')"),
    (Ending.LOST, Facts(), S.FAILED, "worker stopped before the task finished"),
]


@pytest.mark.parametrize(("ending", "facts", "state", "reason"), ENDINGS)
def test_endings(ending: Ending, facts: Facts, state: TaskState, reason: str) -> None:
    assert decide(ending, facts) == (state, reason)


def test_every_ending_has_a_rule_and_ends_terminal() -> None:
    assert set(RULES) == set(Ending) == {row[0] for row in ENDINGS}
    # a task that ran never ends rejected (that is admission's alone), and every terminal
    # state a run can end in is reachable
    assert {row[2] for row in ENDINGS} == TERMINAL - {S.REJECTED}


EXIT_CODES = [
    ("succeeded", 0, 0),
    ("failed", 4, 4),  # the task's own code, like docker run
    ("failed", 137, 137),  # killed by a signal: 128 + 9
    ("failed", None, 1),  # failed without running to an exit (a refused secret, say)
    ("failed", -1, 1),
    ("failed", 0, 1),  # an OOM kill the engine reported as 0 is still a failure
    ("failed", 300, 1),  # not a code a process can exit with
    ("timed_out", 137, 124),
    ("cancelled", 143, 1),
    ("rejected", None, 2),
]


@pytest.mark.parametrize(("state", "code", "expected"), EXIT_CODES)
def test_exit_codes(state: str, code: int | None, expected: int) -> None:
    assert exit_code(state, code) == expected
