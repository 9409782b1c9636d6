"""One task through its whole life on the real Docker engine and Redis, in every ending."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest

from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.lifecycle import TaskState
from orchestrator.errors import RuntimeFailure
from orchestrator.task.credentials import Credentials
from orchestrator.task.executor import Executor

S = TaskState
PROBE = r"""
import json, os
def read(path):
    try:
        return open(path).read().strip()
    except OSError as exc:
        return f"error: {exc.strerror}"
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
try:
    open("/probe", "w")
    root_writable = True
except OSError:
    root_writable = False
facts = {
    "uid": os.getuid(), "gid": os.getgid(),
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "routes": open("/proc/net/route").read().splitlines()[1:],
    "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
    "root_writable": root_writable,
    "memory_limit": read("/sys/fs/cgroup/memory/memory.limit_in_bytes") if os.path.exists("/sys/fs/cgroup/memory") else read("/sys/fs/cgroup/memory.max"),
    "pids_limit": read("/sys/fs/cgroup/pids/pids.max") if os.path.exists("/sys/fs/cgroup/pids") else read("/sys/fs/cgroup/pids.max"),
    "cpu_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") if os.path.exists("/sys/fs/cgroup/cpu") else read("/sys/fs/cgroup/cpu.max"),
    "workspace_writable": os.access("/workspace", os.W_OK),
    "env": sorted(k for k in os.environ if k.startswith("AIRLOCK_")),
}
os.makedirs("output", exist_ok=True)
json.dump(facts, open("output/facts.json", "w"))
print("probe done")
"""


def run(executor: Executor, store: Store, **spec: Any) -> tuple[TaskState, dict[str, Any]]:
    task_id = str(uuid.uuid4())
    data = {"agent": "tester", "command": ["true"], "timeout_s": 60, **spec}
    state = executor.execute(task_id, data)
    return state, Client(executor.settings).status(task_id)


def logs_of(settings: Settings, task_id: str) -> dict[str, str]:
    out: dict[str, str] = {"stdout": "", "stderr": ""}
    for stream, text in Client(settings).logs(task_id):
        out[stream] += text
    return out


def test_success_returns_stdout_exit_code_and_output(executor: Executor, store: Store) -> None:
    state, status = run(
        executor,
        store,
        command=["sh", "-c", "echo hello; echo oops >&2; printf result > output/answer.txt"],
    )
    assert state is S.SUCCEEDED and status["exit_code"] == 0 and status["reason"] == "exit code 0"
    assert logs_of(executor.settings, status["id"]) == {"stdout": "hello\n", "stderr": "oops\n"}
    [out] = status["output"]
    assert out["name"] == "answer.txt" and out["size"] == 6 and not out["truncated"]
    assert Client(executor.settings).output(status["id"]) == [("answer.txt", b"result")]
    states = [e.state for e in store.events(status["id"])]
    assert states == [S.PENDING, S.ADMITTED, S.PROVISIONING, S.RUNNING, S.TEARING_DOWN, S.SUCCEEDED]


def test_container_is_sealed_from_inside(executor: Executor, store: Store) -> None:
    state, status = run(
        executor,
        store,
        command=["python3", "-c", PROBE],
        limits={"memory": "96m", "pids": 40, "cpus": 0.5},
    )
    assert state is S.SUCCEEDED, status
    facts = json.loads(Client(executor.settings).output(status["id"])[0][1])
    assert facts["uid"] != 0 and facts["gid"] != 0
    assert facts["interfaces"] == ["lo"] and facts["routes"] == []
    assert int(facts["cap_eff"], 16) == 0 and int(facts["cap_bnd"], 16) == 0
    assert facts["no_new_privs"] == "1"
    assert facts["root_writable"] is False and facts["workspace_writable"] is True
    assert facts["memory_limit"] == str(96 << 20)
    assert facts["pids_limit"] == "40"
    assert facts["cpu_quota"] in ("50000", "50000 100000")  # half a core (cgroup v1, v2)
    assert "AIRLOCK_RESULT_MARKER" not in facts["env"]  # the runner keeps its nonce to itself


def test_failure_keeps_exit_code(executor: Executor, store: Store) -> None:
    state, status = run(executor, store, command=["sh", "-c", "exit 7"])
    assert (state, status["exit_code"], status["reason"]) == (S.FAILED, 7, "exit code 7")


def test_unknown_command(executor: Executor, store: Store) -> None:
    state, status = run(executor, store, command=["no-such-binary"])
    assert state is S.FAILED and status["exit_code"] == 127
    assert "command not found" in logs_of(executor.settings, status["id"])["stderr"]


def test_deadline_kills_the_container(executor: Executor, store: Store) -> None:
    state, status = run(executor, store, command=["sleep", "60"], timeout_s=1)
    assert state is S.TIMED_OUT
    assert status["reason"] == "deadline of 1s reached; container killed"


def test_out_of_memory_is_named(executor: Executor, store: Store) -> None:
    hog = "x = []\nwhile True: x.append(bytearray(16 << 20))"
    state, status = run(executor, store, command=["python3", "-c", hog], limits={"memory": "48m"})
    assert state is S.FAILED and status["reason"] == "out of memory (limit 48 MiB)"
    assert status["oom_killed"] is True


def running_sleeper(
    executor: Executor, store: Store
) -> tuple[str, threading.Thread, list[TaskState]]:
    """A task sleeping a minute, running in a thread: its id, the thread, its end state."""
    task_id = str(uuid.uuid4())
    result: list[TaskState] = []
    thread = threading.Thread(
        target=lambda: result.append(
            executor.execute(
                task_id, {"agent": "tester", "command": ["sleep", "60"], "timeout_s": 120}
            )
        )
    )
    thread.start()
    for event_state in _states(store, task_id):
        if event_state is S.RUNNING:
            break
    return task_id, thread, result


def test_cancel_stops_a_running_task(executor: Executor, store: Store, settings: Settings) -> None:
    client = Client(settings)
    task_id, thread, result = running_sleeper(executor, store)
    assert client.cancel(task_id, by="alice") == "cancel requested"
    thread.join(timeout=30)
    assert result == [S.CANCELLED]
    status = client.status(task_id)
    assert status["reason"] == "cancelled by alice" and status["cancel_requested_by"] == "alice"
    assert client.cancel(task_id) == "already ended: cancelled"


def test_a_worker_stopping_cancels_its_tasks_in_flight(
    executor: Executor, store: Store, settings: Settings
) -> None:
    task_id, thread, result = running_sleeper(executor, store)
    assert executor.stop_all("worker w1 (shutting down on SIGTERM)") == [task_id]
    thread.join(timeout=30)
    assert result == [S.CANCELLED]
    status = Client(settings).status(task_id)
    assert status["reason"] == "cancelled by worker w1 (shutting down on SIGTERM)"
    assert status["revocation"]["verified"] is True
    assert not [
        c for c in executor.runtime.list_managed(settings.namespace) if c.task_id == task_id
    ]
    assert executor.stop_all("again") == []  # nothing in flight any more


def _states(store: Store, task_id: str):  # type: ignore[no-untyped-def]
    after = "0"
    for _ in range(300):
        for event in (
            store.events(task_id, after, block_ms=100)
            if store.redis.exists(store.key(task_id))
            else []
        ):
            after = event.id
            yield event.state
        if not store.redis.exists(store.key(task_id)):
            import time

            time.sleep(0.05)


def test_cancel_before_start(executor: Executor, store: Store, settings: Settings) -> None:
    task_id = str(uuid.uuid4())
    store.create(task_id, {"agent": "tester"})
    assert Client(settings).cancel(task_id, by="bob") == "cancelled before it started"
    assert executor.execute(task_id, {"agent": "tester", "command": ["true"]}) is S.CANCELLED
    assert store.get(task_id)["reason"] == "cancelled by bob before it started"


def test_output_and_logs_are_capped(executor: Executor, store: Store) -> None:
    settings = executor.settings
    from dataclasses import replace

    small = Executor(
        replace(settings, output_max_bytes=1000, log_max_bytes=2000),
        executor.store,
        executor.runtime,
        credentials=executor.credentials,
    )
    state, status = run(
        small,
        store,
        command=["sh", "-c", "head -c 5000 /dev/zero > output/big; yes line | head -n 2000"],
    )
    assert state is S.SUCCEEDED
    [out] = status["output"]
    assert out["size"] == 5000 and out["truncated"] is True
    assert status["logs_bytes"] == 2000 and status["logs_dropped_bytes"] == 2000 * 5 - 2000


def test_invalid_spec_from_a_raw_producer_is_rejected(executor: Executor, store: Store) -> None:
    task_id = str(uuid.uuid4())
    state = executor.execute(task_id, {"agent": "tester", "command": "rm -rf /", "x": 1})
    assert state is S.REJECTED
    reason = store.get(task_id)["reason"]
    assert "command: Input should be a valid" in reason and "x: Extra inputs" in reason
    assert "container_id" not in store.get(task_id)


def test_missing_image_fails_cleanly(executor: Executor, store: Store) -> None:
    state, status = run(executor, store, image="airlock-no-such-image:1")
    assert state is S.FAILED and "image not found" in status["reason"]


class BreaksAfterStart(DockerRuntime):
    """The real engine, with a fault injected right after the container starts."""

    def start(self, container_id: str) -> None:
        super().start(container_id)
        raise RuntimeFailure("injected fault after start")


def test_worker_error_after_start_leaves_nothing(
    settings: Settings, store: Store, runtime: DockerRuntime, credentials: Credentials
) -> None:
    broken = BreaksAfterStart(settings.docker_host)
    executor = Executor(settings, store, broken, credentials=credentials)
    state, status = run(executor, store, command=["sleep", "60"])
    assert state is S.FAILED and status["reason"] == "error: injected fault after start"


@pytest.mark.parametrize("agent", ["tester", "retired-agent"])
@pytest.mark.parametrize("state", [S.ADMITTED, S.PROVISIONING, S.RUNNING, S.TEARING_DOWN])
def test_redelivered_task_of_a_lost_worker_is_torn_down(
    executor: Executor, store: Store, runtime: DockerRuntime, state: TaskState, agent: str
) -> None:
    """A worker died mid-task; the redelivered message removes its container, runs nothing.
    So it does when the policy would now refuse the task (its agent was retired since)."""
    from tests.test_runtime import make_spec

    spec = make_spec(executor.settings)
    store.create(spec.task_id, {"agent": "tester"})
    store.redis.hset(store.key(spec.task_id), mapping={"state": state.value})
    container_id = runtime.create(spec)
    runtime.start(container_id)
    store.update(spec.task_id, {"container_id": container_id})
    assert executor.execute(spec.task_id, {"agent": agent, "command": ["true"]}) is S.FAILED
    assert store.get(spec.task_id)["reason"] == f"worker lost while {state}" or (
        state is S.TEARING_DOWN
    )
    assert all(c.task_id != spec.task_id for c in runtime.list_managed(executor.settings.namespace))
    assert len([e for e in store.events(spec.task_id) if e.state is S.RUNNING]) == 0


def test_unreachable_docker_fails_the_task_with_that_reason(
    settings: Settings, store: Store, credentials: Credentials
) -> None:
    nowhere = DockerRuntime("tcp://127.0.0.1:1")  # nothing listens on port 1
    state, status = run(Executor(settings, store, nowhere, credentials=credentials), store)
    assert state is S.FAILED
    assert status["reason"].startswith("error: docker is unreachable")
    assert "container_id" not in status
