"""The warm pool: members are sealed runners without identity, bound to one task at its claim."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from orchestrator import config, wiring
from orchestrator.adapters.gateway.member_endpoint import MemberEndpoint
from orchestrator.adapters.gateway.service import LocalGateway
from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.ids import is_member
from orchestrator.core.lifecycle import TaskState
from orchestrator.errors import RuntimeFailure
from orchestrator.task.credentials import Credentials
from orchestrator.task.executor import Executor
from orchestrator.task.pool import WarmPool, pool_sizes
from orchestrator.task.reaper import reap, reap_endpoints
from tests.conftest import running
from tests.test_credentials import QUERY, postgres_roles
from tests.test_executor import PROBE
from tests.test_gateway import exchange
from tests.test_watch import row, start_watch

pytestmark = pytest.mark.docker
S = TaskState
IDENTITY = (
    "import json, os, airlock_task; "
    "print(json.dumps({'task': os.environ['AIRLOCK_TASK_ID'], 'jwt': airlock_task.token()}))"
)


def make_pool(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
    size: int = 2,
    runtime_class: str = "runc",
    **defaults: Any,
) -> WarmPool:
    """A pool for tasks whose limits are `defaults` (the deployment's, unless given)."""
    pool_settings = replace(settings, **defaults)
    sizes = {(settings.runner_image, runtime_class): size}
    return WarmPool(pool_settings, store, runtime, credentials.endpoints, sizes)


@pytest.fixture
def pool(
    settings: Settings, store: Store, runtime: DockerRuntime, credentials: Credentials
) -> Iterator[WarmPool]:
    pool = make_pool(settings, store, runtime, credentials)
    yield pool
    pool.shutdown()


def members(runtime: DockerRuntime, settings: Settings) -> set[str]:
    return {c.id for c in runtime.list_managed(settings.namespace) if is_member(c.task_id)}


def run(
    executor: Executor, agent: str, command: list[str], **spec: Any
) -> tuple[TaskState, dict[str, Any]]:
    task_id = str(uuid.uuid4())
    data = {"agent": agent, "command": command, "timeout_s": 60, **spec}
    state = executor.execute(task_id, data)
    return state, Client(executor.settings).status(task_id)


def probe_warm_and_cold(warm: Executor, **spec: Any) -> dict[str, dict[str, Any]]:
    """What PROBE sees from inside a warm runner (claimed from `warm`'s pool) and inside a
    cold container, for the same spec."""
    cold = Executor(warm.settings, warm.store, warm.runtime, credentials=warm.credentials)
    facts = {}
    for name, executor in (("warm", warm), ("cold", cold)):
        state, status = run(executor, "tester", ["python3", "-c", PROBE], **spec)
        assert state is S.SUCCEEDED, status
        assert ("warm_runner" in status) == (name == "warm")
        facts[name] = json.loads(Client(warm.settings).output(status["id"])[0][1])
    return facts


def task_accessors(vault: Vault) -> set[str]:
    return set(vault.list("auth/token/accessors"))


def test_a_warm_task_is_sealed_and_identified_like_a_cold_one(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
    pool: WarmPool,
    vault: Vault,
) -> None:
    pool.tend()
    assert pool.ready() == 2 and len(members(runtime, settings)) == 2
    before = task_accessors(vault)
    warm = Executor(settings, store, runtime, credentials=credentials, pool=pool)
    facts = probe_warm_and_cold(warm)
    assert facts["warm"] == facts["cold"]  # same user, no network, no caps, same limits
    assert facts["warm"]["interfaces"] == ["lo"] and facts["warm"]["uid"] != 0

    # Its identity: the task's id and a JWT for exactly that task, minted at the claim.
    state, status = run(warm, "tester", ["python3", "-c", IDENTITY])
    assert state is S.SUCCEEDED, status
    said = json.loads("".join(t for _, t in store.iter_logs(status["id"])))
    assert said["task"] == status["id"]
    verifier = credentials.verifier()
    verifier.is_live = lambda *_: True  # the task has ended; its signature and claims remain
    claims = verifier.verify(said["jwt"])
    assert claims["task_id"] == status["id"] and claims["jti"] == status["jwt_jti"]
    assert status["revocation"]["verified"]
    assert set(vault.list("auth/token/accessors")) <= before  # nothing outlived it


def test_a_warm_task_runs_at_its_own_limits_not_the_pools(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
    pool: WarmPool,
) -> None:
    pool.tend()
    limits = {"cpus": 0.5, "memory": "300m", "pids": 100}
    facts = probe_warm_and_cold(
        Executor(settings, store, runtime, credentials=credentials, pool=pool), limits=limits
    )
    # The command ran under the task's ceilings, not the ones the member was started with.
    assert facts["warm"] == facts["cold"]
    assert facts["warm"]["memory_limit"] == str(300 << 20)
    assert facts["warm"]["pids_limit"] == "100"
    assert facts["warm"]["cpu_quota"] in ("50000", "50000 100000")
    assert pool.ready() == 1  # the other member still waits at the default limits


class RefusesResize(DockerRuntime):
    """The real engine, refusing to change a container's ceilings (as runsc does)."""

    def resize(self, container_id: str, cpus: float, memory: int, pids: int) -> None:
        raise RuntimeFailure("injected: cannot update this container")


def test_a_member_that_cannot_take_the_limits_is_removed_and_the_task_starts_cold(
    settings: Settings, store: Store, credentials: Credentials
) -> None:
    stubborn = RefusesResize(settings.docker_host)
    pool = make_pool(settings, store, stubborn, credentials, size=1)
    try:
        pool.tend()
        (member,) = members(stubborn, settings)
        executor = Executor(settings, store, stubborn, credentials=credentials, pool=pool)
        state, status = run(executor, "tester", ["true"], limits={"pids": 100})
        assert state is S.SUCCEEDED, status
        assert "warm_runner" not in status
        assert member not in {c.id for c in stubborn.list_managed(settings.namespace)}
        assert store.pool_members() == {}
    finally:
        pool.shutdown()


def test_a_warm_database_task_gets_its_own_credentials_at_the_claim(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
    vault: Vault,
) -> None:
    # The dba agent's ceiling caps its pids at 128: a pool for tasks of that shape.
    pool = make_pool(settings, store, runtime, credentials, size=1, default_pids=128)
    try:
        pool.tend()
        waiting = store.journaled_tasks()
        roles = postgres_roles()
        before = task_accessors(vault)
        executor = Executor(settings, store, runtime, credentials=credentials, pool=pool)
        state, status = run(executor, "dba", ["sh", "-c", QUERY])
        logs = "".join(t for _, t in store.iter_logs(status["id"]))
        assert state is S.SUCCEEDED, (status["reason"], logs)
        assert status["warm_runner"] and logs == "checkout\n"
        assert status["id"] not in waiting  # nothing was journaled for it before the claim
        receipt = status["revocation"]
        assert receipt["verified"] is True and receipt["token"]["accessor"] not in before
        assert postgres_roles() <= roles  # its database role was created and dropped
    finally:
        pool.shutdown()


def test_an_unclaimed_member_speaks_for_nobody(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
    pool: WarmPool,
) -> None:
    pool.tend()
    member = pool._ready[(settings.runner_image, "runc")][0]
    assert isinstance(credentials.endpoints, LocalGateway)
    assert isinstance(credentials.endpoints.server.handlers[member.key], MemberEndpoint)
    sock = str(member.directory / "airlock.sock")
    status, _, body = exchange(
        sock, b"POST /v1/bootstrap HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert status == 403 and b"no task has claimed" in body
    status, _, body = exchange(
        sock, b"GET http://127.0.0.1:18080/api/x HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n"
    )
    assert status == 407 and b"no task has claimed" in body
    assert not store.journaled_tasks() & {member.key}


def test_no_member_serves_two_tasks(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
    pool: WarmPool,
) -> None:
    pool.tend()
    first = members(runtime, settings)
    executor = Executor(settings, store, runtime, credentials=credentials, pool=pool)
    used = []
    for _ in range(3):  # the third finds the pool empty and starts cold
        state, status = run(executor, "tester", ["true"])
        assert state is S.SUCCEEDED, status
        used.append(status.get("warm_runner"))
    assert used[0] and used[1] and used[0] != used[1] and used[2] is None
    assert members(runtime, settings) == set()  # each member went with its task
    pool.tend()
    refilled = members(runtime, settings)
    assert len(refilled) == 2 and not refilled & first


def test_old_and_orphaned_members_are_removed(
    settings: Settings, store: Store, runtime: DockerRuntime, credentials: Credentials
) -> None:
    now = [time.time()]
    pool = make_pool(settings, store, runtime, credentials, pool_max_age_s=60)
    pool.clock = lambda: now[0]
    try:
        pool.tend()
        first = members(runtime, settings)
        now[0] += 61
        pool.tend()  # recycled: removed and replaced
        second = members(runtime, settings)
        assert len(second) == 2 and not second & first
        # A worker that died: its members' heartbeats lapse and the reaper takes them.
        for member in pool._ready[(settings.runner_image, "runc")]:
            store.redis.delete(store.key(member.key, "owner"))
        found = reap(store, runtime, settings.namespace)
        assert {r.id for r in found} == second
        assert all("stopped sending heartbeats" in r.why for r in found)
        assert members(runtime, settings) == set()
        endpoints = reap_endpoints(store, credentials)
        assert {r.task_id for r in endpoints} >= {
            m.key for m in pool._ready[next(iter(pool._ready))]
        }
    finally:
        pool.shutdown()
    assert members(runtime, settings) == set()
    assert store.pool_members() == {}


def test_a_warm_gvisor_task_runs_on_the_gvisor_kernel(
    settings: Settings, store: Store, runtime: DockerRuntime, credentials: Credentials
) -> None:
    if "runsc" not in runtime.runtimes():
        pytest.skip("runsc is not registered with this Docker engine")
    pool = make_pool(
        settings,
        store,
        runtime,
        credentials,
        1,
        "runsc",
        default_memory=256 << 20,
        default_pids=128,
    )
    try:
        pool.tend()
        executor = Executor(settings, store, runtime, credentials=credentials, pool=pool)
        state, status = run(executor, "sandboxed", ["dmesg"])
        logs = "".join(t for _, t in store.iter_logs(status["id"]))
        assert state is S.SUCCEEDED, (status, logs)
        assert status["warm_runner"] and "gVisor" in logs
        # runsc cannot change a running sandbox's ceilings: other limits start cold, and
        # the member that was made meanwhile stays for a task at the pool's limits.
        pool.tend()
        state, status = run(executor, "sandboxed", ["true"], limits={"pids": 64})
        assert state is S.SUCCEEDED and "warm_runner" not in status, status
        assert pool.ready() == 1
    finally:
        pool.shutdown()


def test_a_worker_keeps_its_pool_shows_it_and_removes_it_when_stopped(
    settings: Settings, runtime: DockerRuntime, store: Store, vault: Vault, tmp_path: Any
) -> None:
    queue = f"{settings.queue}-warm"
    endpoints = tempfile.mkdtemp(prefix="al-warm-")  # socket paths stay short
    with running(
        settings,
        "worker",
        "-Q",
        queue,
        "-c",
        "1",
        log=f"worker-warm-{settings.namespace}",
        AIRLOCK_POOL_SIZE="1",
        AIRLOCK_ENDPOINT_DIR=endpoints,
        TMPDIR=str(tmp_path),
    ):
        for _ in range(300):  # filled at start, before any task
            if store.pool_members():
                break
            time.sleep(0.1)
        [member] = store.pool_members()
        if shutil.which("tmux"):
            session = f"airlock-warm-{uuid.uuid4().hex[:6]}"
            start_watch(settings, session)
            try:
                line = row(session, member[:13], "warm")
                assert "ready" in line, line
            finally:
                subprocess.run(["tmux", "kill-session", "-t", session], check=False)
        client = Client(replace(settings, queue=queue))
        done = client.wait(client.submit({"agent": "tester", "command": ["true"]}), timeout_s=60)
        assert done["state"] == "succeeded" and done["warm_runner"] == member, done
        for _ in range(300):  # refilled in the background
            if set(store.pool_members()) - {member}:
                break
            time.sleep(0.1)
        assert set(store.pool_members()) - {member}
    # Stopped (SIGTERM): its unclaimed members went with it.
    assert members(runtime, settings) == set()
    assert store.pool_members() == {}


def test_a_warm_claim_that_cannot_get_credentials_leaves_nothing(
    settings: Settings, store: Store, runtime: DockerRuntime
) -> None:
    cut_off = replace(settings, vault_addr="http://127.0.0.1:1")
    credentials = wiring.credentials(cut_off, store)
    pool = make_pool(cut_off, store, runtime, credentials, size=1)
    try:
        pool.tend()
        [member] = pool._ready[(settings.runner_image, "runc")]
        executor = Executor(cut_off, store, runtime, credentials=credentials, pool=pool)
        state, status = run(executor, "tester", ["true"])
        assert state is S.FAILED and "vault is unreachable" in status["reason"], status
        assert status["warm_runner"] == member.key
        assert all(c.id != member.container_id for c in runtime.list_managed(settings.namespace))
        assert not member.directory.exists()  # its endpoint went with it, not to the reaper
    finally:
        pool.shutdown()
        credentials.endpoints.shutdown()


def test_a_member_that_died_is_replaced_not_handed_out(
    settings: Settings, store: Store, runtime: DockerRuntime, credentials: Credentials
) -> None:
    pool = make_pool(settings, store, runtime, credentials, size=1)
    try:
        pool.tend()
        [dead] = pool._ready[(settings.runner_image, "runc")]
        runtime.api.kill(dead.container_id)
        runtime.wait(dead.container_id)
        pool.tend()
        [fresh] = pool._ready[(settings.runner_image, "runc")]
        assert fresh.key != dead.key
        assert all(c.id != dead.container_id for c in runtime.list_managed(settings.namespace))
        assert not dead.directory.exists()
    finally:
        pool.shutdown()


def test_any_image_can_have_a_warm_pool() -> None:
    settings = config.load(
        {
            "AIRLOCK_POOL_SIZE": "2",
            "AIRLOCK_POOL_GVISOR_SIZE": "1",
            "AIRLOCK_POOL_IMAGES": "airlock-runner:latest, airlock-busybox:latest,",
        }
    )
    assert pool_sizes(settings, frozenset({"runc", "runsc"})) == {
        ("airlock-runner:latest", "runc"): 2,
        ("airlock-runner:latest", "runsc"): 1,
        ("airlock-busybox:latest", "runc"): 2,
        ("airlock-busybox:latest", "runsc"): 1,
    }
    default = config.load({"AIRLOCK_POOL_SIZE": "3"})
    assert pool_sizes(default, frozenset({"runc"})) == {(default.runner_image, "runc"): 3}
