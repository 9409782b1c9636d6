"""The reaper: removes what a lost worker left behind, found by label and journal.

A container is an orphan when its task record is gone, its task has ended, its deadline
passed more than a grace period ago (a live worker kills it at the deadline itself), or the
worker running it stopped sending heartbeats. A task still marked live whose container is
reaped is ended as failed.
Journaled credentials of tasks that are no longer live are revoked (and verified), and
endpoint directories of such tasks are removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from orchestrator.adapters.runtime.base import ManagedContainer, Runtime
from orchestrator.adapters.store import Store
from orchestrator.core.ids import is_member, is_task_id
from orchestrator.core.lifecycle import TERMINAL, TaskState, advance
from orchestrator.errors import IllegalTransition, TaskNotFound
from orchestrator.task.credentials import Credentials

log = logging.getLogger(__name__)

# How long past its deadline a container may live before it counts as abandoned: the
# worker's own stop grace plus time for its teardown to finish.
DEADLINE_GRACE_S = 30.0


@dataclass(frozen=True)
class Reaped:
    kind: str  # container, task, credentials, journal, endpoint or audit
    id: str
    task_id: str
    why: str
    removed: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def orphan_reason(
    container: ManagedContainer, state: TaskState | None, owned: bool, now: float
) -> str | None:
    """Why this container should go, or None if it belongs to a live task."""
    if state is None:
        return "no task record"
    if state in TERMINAL:
        return f"task already {state.value}"
    if now > container.deadline + DEADLINE_GRACE_S:
        return "past its deadline"
    if not owned:
        return "its worker stopped sending heartbeats"
    return None


def _state(store: Store, task_id: str) -> TaskState | None:
    try:
        return TaskState(store.get(task_id)["state"])
    except TaskNotFound:
        return None


def _not_live(state: TaskState | None) -> str | None:
    if state is None:
        return "no task record"
    if state in TERMINAL:
        return f"task already {state.value}"
    return None


def reap(
    store: Store,
    runtime: Runtime,
    namespace: str,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
) -> list[Reaped]:
    """Remove every orphaned container of `namespace`; returns what was (or would be) done."""
    done = []
    now = clock()
    for container in runtime.list_managed(namespace):
        task_id = _task_of(store, container.task_id)
        if is_member(task_id):  # a warm runner no task has claimed
            why = member_orphan_reason(container, store.has_owner(task_id), now)
            if why is not None:
                removed = False if dry_run else runtime.remove(container.id)
                if not dry_run:
                    store.pool_forget(task_id)
                done.append(Reaped("container", container.id, task_id, why, removed))
            continue
        state = _state(store, task_id)
        why = orphan_reason(container, state, store.has_owner(task_id), now)
        if why is None:
            continue
        removed = False
        if not dry_run:
            removed = runtime.remove(container.id)
            if state is not None and state not in TERMINAL:
                _end(store, task_id, state, f"reaped: container {why}")
        done.append(Reaped("container", container.id, task_id, why, removed))
    return done


def _task_of(store: Store, key: str) -> str:
    """The task a container (or endpoint) belongs to: a claimed warm runner's is its task's."""
    if is_member(key):
        return store.pool_task(key) or key
    return key


def member_orphan_reason(container: ManagedContainer, owned: bool, now: float) -> str | None:
    if now > container.deadline:
        return "warm runner past its maximum age"
    if not owned:
        return "warm runner of a worker that stopped sending heartbeats"
    return None


# States in which a task has a worker that heartbeats for it (pending ones wait in the queue).
OWNED = frozenset(TaskState) - TERMINAL - {TaskState.PENDING}


def reap_tasks(
    store: Store, runtime: Runtime, namespace: str, dry_run: bool = False
) -> list[Reaped]:
    """End live tasks that no worker owns and that have no container: nobody will end them."""
    done = []
    containers = {_task_of(store, c.task_id) for c in runtime.list_managed(namespace)}
    for task_id, state in store.live_tasks().items():
        if state not in OWNED or task_id in containers or store.has_owner(task_id):
            continue
        why = f"its worker was lost while {state.value} and it has no container"
        if not dry_run:
            _end(store, task_id, state, f"reaped: {why}")
        done.append(Reaped("task", task_id, task_id, why, not dry_run))
    return done


def reap_credentials(store: Store, credentials: Credentials, dry_run: bool = False) -> list[Reaped]:
    """Revoke the journaled credentials of every task that is no longer live."""
    done = []
    for task_id in sorted(store.journaled_tasks()):
        if not is_task_id(task_id):  # written by no worker: dropped, never acted on
            if not dry_run:
                store.forget_credentials(task_id)
            done.append(Reaped("journal", "", task_id[:80], "not a task id", not dry_run))
            continue
        state = _state(store, task_id)
        why = _not_live(state)
        if why is None:
            continue
        fields, _ = store.journaled(task_id)
        removed = False
        if not dry_run:
            receipt = credentials.revoke(task_id)
            removed = bool(receipt.get("verified"))
            if state is not None:
                pending = 0 if removed else 1
                store.update(task_id, {"revocation": receipt, "revocation_pending": pending})
                verdict = "revoked and verified" if removed else "revocation not verified yet"
                store.note(task_id, f"reaper: credentials {verdict} ({why})")
        done.append(Reaped("credentials", fields.get("token_accessor", ""), task_id, why, removed))
    return done


def reap_endpoints(store: Store, credentials: Credentials, dry_run: bool = False) -> list[Reaped]:
    """Remove endpoint directories whose task is no longer live."""
    done = []

    def why_not_live(key: str) -> str | None:
        task_id = _task_of(store, key)
        if is_member(task_id):
            return None if store.has_owner(task_id) else "warm runner of a stopped worker"
        return _not_live(_state(store, task_id))

    for task_id in credentials.endpoints.stale(lambda t: why_not_live(t) is None):
        why = why_not_live(task_id) or "not live"
        removed = False if dry_run else credentials.endpoints.close(task_id)
        if removed:
            store.note(task_id, f"reaper: endpoint removed ({why})")
        done.append(
            Reaped("endpoint", str(credentials.endpoints.directory(task_id)), task_id, why, removed)
        )
    return done


def trim_audit(credentials: Credentials, dry_run: bool = False) -> list[Reaped]:
    """Retention of the egress audit, by age and size (the chains stay verifiable)."""
    if dry_run:
        return []
    settings = credentials.settings
    removed = credentials.audit.trim(settings.audit_max_age_s, settings.audit_max_records)
    if not removed:
        return []
    why = (
        f"older than {settings.audit_max_age_s}s or beyond the newest {settings.audit_max_records}"
    )
    return [Reaped("audit", f"{removed} records", "-", why, True)]


def _end(store: Store, task_id: str, state: TaskState, reason: str) -> None:
    try:
        if state is not TaskState.TEARING_DOWN:
            advance(store, task_id, TaskState.TEARING_DOWN, reason)
        advance(store, task_id, TaskState.FAILED, reason)
    except IllegalTransition:
        pass  # its worker got there first


def reap_all(
    store: Store,
    runtime: Runtime,
    credentials: Credentials,
    namespace: str,
    dry_run: bool = False,
) -> list[Reaped]:
    """Containers first (ending overrun tasks), then live tasks nobody runs any more, then
    the credentials and endpoints of every task that has ended."""
    found = reap(store, runtime, namespace, dry_run)
    found += reap_tasks(store, runtime, namespace, dry_run)
    found += reap_credentials(store, credentials, dry_run)
    found += reap_endpoints(store, credentials, dry_run)
    found += trim_audit(credentials, dry_run)
    for item in found:
        log.warning("reaped %s of task %s: %s", item.kind, item.task_id, item.why)
    return found
