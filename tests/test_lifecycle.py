"""Every state pair, against the real Redis store: legal moves happen, all others are refused."""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import replace

import pytest

from orchestrator.adapters.store import Store
from orchestrator.config import Settings
from orchestrator.core.lifecycle import TERMINAL, TRANSITIONS, TaskState, advance, allowed
from orchestrator.errors import IllegalTransition, TaskNotFound

S = TaskState
PAIRS = list(itertools.product(TaskState, TaskState))


def seeded(store: Store, state: TaskState) -> str:
    """A task record sitting in `state` (written directly: this is the test's setup)."""
    task_id = str(uuid.uuid4())
    assert store.create(task_id, {"agent": "t"})
    store.redis.hset(store.key(task_id), "state", state.value)
    return task_id


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(TaskState)
    assert all(not TRANSITIONS[s] for s in TERMINAL)
    # every non-terminal state can reach a terminal one
    for state in set(TaskState) - TERMINAL:
        seen, frontier = set(), {state}
        while frontier:
            seen |= frontier
            frontier = {n for s in frontier for n in TRANSITIONS[s]} - seen
        assert seen & TERMINAL, state


@pytest.mark.parametrize(("current", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_every_pair(store: Store, current: TaskState, target: TaskState) -> None:
    task_id = seeded(store, current)
    events_before = len(store.events(task_id))
    if allowed(current, target):
        assert advance(store, task_id, target, "because") is current
        record = store.get(task_id)
        assert record["state"] == target.value and record["reason"] == "because"
        last = store.events(task_id)[-1]
        assert (last.previous, last.state, last.reason) == (current, target, "because")
        assert ("finished_at" in record) == (target in TERMINAL)
    else:
        with pytest.raises(IllegalTransition):
            advance(store, task_id, target, "because")
        assert store.get(task_id)["state"] == current.value
        assert len(store.events(task_id)) == events_before


def test_unknown_task(store: Store) -> None:
    with pytest.raises(TaskNotFound):
        advance(store, "no-such-task", S.ADMITTED, "x")


def test_create_is_idempotent(store: Store) -> None:
    task_id = str(uuid.uuid4())
    assert store.create(task_id, {"agent": "a"})
    advance(store, task_id, S.ADMITTED, "ok")
    assert not store.create(task_id, {"agent": "b"})
    assert store.get(task_id)["state"] == "admitted"


def test_racing_writers_only_one_wins(store: Store) -> None:
    """A user's cancel and a worker's admission race; exactly one of them takes effect."""
    for _ in range(20):
        task_id = seeded(store, S.PENDING)
        results: list[str] = []
        barrier = threading.Barrier(2)

        def attempt(
            target: TaskState, task_id: str, results: list[str], barrier: threading.Barrier
        ) -> None:
            barrier.wait()
            try:
                advance(store, task_id, target, "race")
                results.append(target.value)
            except IllegalTransition:
                pass

        threads = [
            threading.Thread(target=attempt, args=(t, task_id, results, barrier))
            for t in (S.ADMITTED, S.CANCELLED)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 1
        assert store.get(task_id)["state"] == results[0]


def test_terminal_records_expire(store: Store) -> None:
    task_id = seeded(store, S.TEARING_DOWN)
    store.append_log(task_id, "stdout", "x")
    advance(store, task_id, S.SUCCEEDED, "done")
    for part in ("", "events", "logs"):
        assert 0 < store.redis.ttl(store.key(task_id, part)) <= store.record_ttl_s


def test_every_waiter_wakes_once_when_the_task_ends(settings: Settings, store: Store) -> None:
    from orchestrator.client import Client

    task_id = seeded(store, S.TEARING_DOWN)
    client = Client(replace(settings, namespace=store.ns))
    woke: list[str] = []
    waiters = [
        threading.Thread(target=lambda: woke.append(client.wait(task_id, 60)["state"]), daemon=True)
        for _ in range(3)
    ]
    for waiter in waiters:
        waiter.start()
    assert not store.wait_ended(task_id, 200)  # not ended yet: the wait times out
    advance(store, task_id, S.SUCCEEDED, "done")
    for waiter in waiters:
        waiter.join(5)  # woken by the end itself: a blocked read would last 10 s
    assert woke == ["succeeded"] * 3
    # A late waiter returns at once; the mark stays one element and expires with the record.
    assert client.wait(task_id, 5)["state"] == "succeeded"
    ended = store.key(task_id, "ended")
    assert store.redis.llen(ended) == 1 and store.redis.ttl(ended) > 0


def test_a_wait_times_out_on_a_task_that_does_not_end(settings: Settings, store: Store) -> None:
    from orchestrator.client import Client

    task_id = seeded(store, S.RUNNING)
    status = Client(replace(settings, namespace=store.ns)).wait(task_id, 0.3)
    assert status["state"] == "running"


def test_an_advance_can_carry_the_first_heartbeat(store: Store) -> None:
    plain, owned = seeded(store, S.PENDING), seeded(store, S.PENDING)
    advance(store, plain, S.ADMITTED, "admitted")
    advance(store, owned, S.ADMITTED, "admitted", owner_s=30)
    assert not store.has_owner(plain) and store.has_owner(owned)
    assert 0 < store.redis.pttl(store.key(owned, "owner")) <= 30_000
