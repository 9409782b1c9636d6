"""The life of one task as an explicit state machine.

Every state write goes through `advance`, which refuses a transition the table does not
allow. The check and the write are one atomic step in the store, so two writers racing
(a worker finishing while a user cancels) can never both win.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from orchestrator.errors import IllegalTransition


class TaskState(str, Enum):
    PENDING = "pending"  # recorded and queued; no worker has taken it yet
    ADMITTED = "admitted"  # a worker took it and the spec passed admission
    PROVISIONING = "provisioning"  # creating the container and what it is given
    RUNNING = "running"  # the task command is running
    TEARING_DOWN = "tearing_down"  # removing the container and revoking what it had
    SUCCEEDED = "succeeded"  # command exited 0
    FAILED = "failed"  # command exited non-zero, was OOM-killed, or Airlock hit an error
    TIMED_OUT = "timed_out"  # killed at its deadline
    CANCELLED = "cancelled"  # killed (or never started) because someone cancelled it
    REJECTED = "rejected"  # refused before anything was started

    def __str__(self) -> str:
        return self.value


S = TaskState
log = logging.getLogger(__name__)

# What the worker running a task can be woken by (the task's signal list in the store).
SIGNAL_EXIT = "exit"  # the container's output ended: it has exited
SIGNAL_CANCEL = "cancel"  # someone asked for the task to end


@dataclass(frozen=True)
class Event:
    """One state change of a task, as its event stream has it."""

    id: str
    task_id: str
    state: TaskState
    reason: str
    at: float
    previous: TaskState | None


class StateStore(Protocol):
    """Where states are kept: one atomic compare-and-set (the store adapter has it)."""

    def compare_and_set_state(
        self,
        task_id: str,
        sources: frozenset[TaskState],
        target: TaskState,
        reason: str,
        fields: Mapping[str, Any],
        owner_s: float = 0,
    ) -> TaskState: ...


TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.CANCELLED, S.REJECTED})
# Outcomes a teardown may end in; REJECTED never needs one, nothing was started.
TEARDOWN_OUTCOMES = frozenset({S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.CANCELLED})

TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    S.PENDING: frozenset({S.ADMITTED, S.REJECTED, S.CANCELLED, S.FAILED}),
    S.ADMITTED: frozenset({S.PROVISIONING, S.TEARING_DOWN}),
    S.PROVISIONING: frozenset({S.RUNNING, S.TEARING_DOWN}),
    S.RUNNING: frozenset({S.TEARING_DOWN}),
    S.TEARING_DOWN: TEARDOWN_OUTCOMES,
    **{state: frozenset() for state in TERMINAL},
}


def allowed(current: TaskState | None, target: TaskState) -> bool:
    """Whether `current -> target` is legal; None is 'no record yet' and may only become pending."""
    if current is None:
        return target is S.PENDING
    return target in TRANSITIONS[current]


def sources(target: TaskState) -> frozenset[TaskState]:
    """Every state from which `target` may be entered."""
    return frozenset(state for state, targets in TRANSITIONS.items() if target in targets)


def advance(
    store: StateStore,
    task_id: str,
    target: TaskState,
    reason: str,
    owner_s: float = 0,
    **fields: Any,
) -> TaskState:
    """Move a task to `target`, recording `reason` and `fields`; returns the previous state.
    With `owner_s`, the same step is the running worker's first heartbeat.

    Raises IllegalTransition if the task is not in a state from which `target` is legal
    (a task that already ended included), TaskNotFound if there is no such task.
    """
    return store.compare_and_set_state(task_id, sources(target), target, reason, fields, owner_s)


def try_advance(
    store: StateStore, task_id: str, target: TaskState, reason: str, **fields: Any
) -> bool:
    """advance(), where losing a race (the task moved on meanwhile) is not an error."""
    try:
        advance(store, task_id, target, reason, **fields)
    except IllegalTransition as exc:
        log.info("task %s: %s", task_id, exc)
        return False
    return True
