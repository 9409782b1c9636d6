"""The reaper removes exactly the containers no live task owns, and ends overrun tasks."""

from __future__ import annotations

import json
import time
import uuid

from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.config import Settings
from orchestrator.core.lifecycle import TaskState
from orchestrator.task.reaper import DEADLINE_GRACE_S, reap, reap_tasks
from tests.conftest import airlock, running
from tests.test_runtime import make_spec


def container_for(
    settings: Settings,
    runtime: DockerRuntime,
    store: Store,
    state: TaskState | None,
    deadline: float,
    owned: bool = True,
) -> str:
    spec = make_spec(settings, deadline=deadline)
    if state is not None:
        store.create(spec.task_id, {"agent": "tester"})
        store.redis.hset(store.key(spec.task_id), "state", state.value)
        if owned:
            store.heartbeat(spec.task_id, 60)
    runtime.create(spec)
    return spec.task_id


def test_reap_takes_only_orphans(settings: Settings, runtime: DockerRuntime, store: Store) -> None:
    now = time.time()
    gone = container_for(settings, runtime, store, None, now + 60)
    ended = container_for(settings, runtime, store, TaskState.SUCCEEDED, now + 60)
    live = container_for(settings, runtime, store, TaskState.RUNNING, now + 60)
    overrun = container_for(settings, runtime, store, TaskState.RUNNING, now - DEADLINE_GRACE_S - 1)
    abandoned = container_for(settings, runtime, store, TaskState.RUNNING, now + 60, owned=False)

    planned = reap(store, runtime, settings.namespace, dry_run=True)
    assert {r.task_id for r in planned} == {gone, ended, overrun, abandoned}
    assert not any(r.removed for r in planned)
    assert len(runtime.list_managed(settings.namespace)) == 5  # a dry run removes nothing

    done = {r.task_id: r for r in reap(store, runtime, settings.namespace)}
    assert set(done) == {gone, ended, overrun, abandoned} and all(r.removed for r in done.values())
    assert done[gone].why == "no task record"
    assert done[ended].why == "task already succeeded"
    assert done[overrun].why == "past its deadline"
    assert done[abandoned].why == "its worker stopped sending heartbeats"
    assert store.get(abandoned)["state"] == "failed"
    assert [c.task_id for c in runtime.list_managed(settings.namespace)] == [live]
    assert store.get(overrun)["state"] == "failed"
    assert store.get(overrun)["reason"] == "reaped: container past its deadline"
    assert store.get(live)["state"] == "running"
    for container in runtime.list_managed(settings.namespace):
        runtime.remove(container.id)


def test_live_tasks_nobody_runs_are_ended(
    settings: Settings, runtime: DockerRuntime, store: Store
) -> None:
    """A task whose worker died before it had a container: the record must not stay live."""

    def task(state: TaskState, owned: bool) -> str:
        task_id = str(uuid.uuid4())
        store.create(task_id, {"agent": "tester"})
        store.redis.hset(store.key(task_id), "state", state.value)
        if owned:
            store.heartbeat(task_id, 60)
        return task_id

    lost = task(TaskState.PROVISIONING, owned=False)
    lost_running = task(TaskState.RUNNING, owned=False)
    working = task(TaskState.PROVISIONING, owned=True)
    queued = task(TaskState.PENDING, owned=False)
    with_container = container_for(
        settings, runtime, store, TaskState.RUNNING, time.time() + 60, owned=False
    )

    planned = {r.task_id for r in reap_tasks(store, runtime, settings.namespace, dry_run=True)}
    assert {lost, lost_running} <= planned
    assert not planned & {working, queued, with_container}  # containers are reap()'s part
    assert store.get(lost)["state"] == "provisioning"  # a dry run changes nothing

    reap_tasks(store, runtime, settings.namespace)
    for task_id in (lost, lost_running):
        record = store.get(task_id)
        assert record["state"] == "failed", record
        assert "worker was lost" in record["reason"]
        assert [e.state.value for e in store.events(task_id)][-2:] == ["tearing_down", "failed"]
    assert store.get(working)["state"] == "provisioning"
    assert store.get(queued)["state"] == "pending"
    reap(store, runtime, settings.namespace)
    assert store.get(with_container)["state"] == "failed"


def test_gc_command(settings: Settings, runtime: DockerRuntime, store: Store) -> None:
    orphan = container_for(settings, runtime, store, None, time.time() + 60)
    dry = airlock(settings, "gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = [(r["kind"], r["task_id"]) for r in json.loads(dry.stdout)]
    # Only its orphan among the containers; a record another test of this session left
    # unowned may be ended too (the session shares one namespace).
    assert [p for p in planned if p[0] != "task"] == [("container", orphan)], planned
    assert runtime.list_managed(settings.namespace)  # a dry run removes nothing
    real = airlock(settings, "gc")
    assert real.returncode == 0 and f"(task {orphan}): no task record" in real.stdout
    assert runtime.list_managed(settings.namespace) == []
    assert uuid.UUID(orphan)


def test_beat_schedules_the_reaper_on_the_workers(
    settings: Settings, runtime: DockerRuntime, store: Store, vault: object, tmp_path: object
) -> None:
    """`airlock beat` enqueues the reaper; a `--no-beat` worker runs it; the orphan goes."""
    from dataclasses import replace

    isolated = replace(settings, queue=f"{settings.queue}-beat")

    def gone(task_id: str) -> bool:
        for _ in range(300):
            if all(c.task_id != task_id for c in runtime.list_managed(settings.namespace)):
                return True
            time.sleep(0.1)
        return False

    # The worker reaps once as it starts; this first orphan shows it is up and has done so.
    first = container_for(settings, runtime, store, None, time.time() + 60)
    with (
        running(
            isolated,
            "worker",
            "--no-beat",
            "-c",
            "1",
            "-Q",
            isolated.queue,
            AIRLOCK_REAP_PERIOD_S="1",
            TMPDIR=str(tmp_path),
        ),
        running(isolated, "beat", AIRLOCK_REAP_PERIOD_S="1", TMPDIR=str(tmp_path)),
    ):
        assert gone(first)
        later = container_for(settings, runtime, store, None, time.time() + 60)
        assert gone(later)  # only a scheduled reap can have taken this one
