"""Fixtures over the real services that scripts/bootstrap starts.

Every test session works in its own namespace (Redis keys, Celery queue, container labels),
so it neither sees nor disturbs anything else on the machine. A missing service skips the
tests that need it, except under CI=true, where it fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import config, wiring
from orchestrator.adapters import telemetry
from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.adapters.vault.setup import setup
from orchestrator.config import Settings
from orchestrator.errors import AirlockError
from orchestrator.policy.agents import load_registry
from orchestrator.task.credentials import Credentials
from orchestrator.task.executor import Executor

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Chaos tests restart host services (dockerd among them): they go after all others."""
    items.sort(key=lambda item: item.get_closest_marker("chaos") is not None)


def _service_missing(what: str, exc: Exception) -> None:
    message = f"{what} is not available: {exc} (run scripts/bootstrap)"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    endpoint_dir = Path(tempfile.mkdtemp(prefix="airlock-endpoints-"))
    yield replace(
        config.load(),
        namespace=namespace,
        queue=namespace,
        stop_grace_s=1.0,
        agents_dir=ROOT / "tests" / "agents",
        callers_file=ROOT / "tests" / "callers.yaml",
        endpoint_dir=endpoint_dir,
    )
    shutil.rmtree(endpoint_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def store(settings: Settings) -> Iterator[Store]:
    store = Store(settings.redis_url, settings.namespace, record_ttl_s=600)
    try:
        store.ping()
    except AirlockError as exc:
        _service_missing("Redis", exc)
    # This process traces as a worker does (wiring.executor sets it up for real workers).
    telemetry.setup(settings, "worker", store)
    yield store
    for key in store.redis.scan_iter(f"{settings.namespace}:*", count=1000):
        store.redis.delete(key)
    store.close()


@pytest.fixture(scope="session")
def runtime(settings: Settings) -> DockerRuntime:
    try:
        runtime = DockerRuntime(settings.docker_host)
        runtime.ping()
        runtime.api.inspect_image(settings.runner_image)
    except Exception as exc:
        _service_missing(f"Docker engine with image {settings.runner_image}", exc)
    return runtime


@pytest.fixture(scope="session")
def vault(settings: Settings) -> Vault:
    """Vault, set up for the test agents (the fixture every credential test stands on)."""
    vault = Vault(settings.vault_addr, settings.vault_token)
    try:
        vault.ping()
    except AirlockError as exc:
        _service_missing("Vault (OpenBao)", exc)
    if not settings.postgres_url:
        _service_missing("PostgreSQL for Vault", Exception("AIRLOCK_POSTGRES_URL is not set"))
    setup(
        vault,
        load_registry(settings.agents_dir),
        settings.postgres_url,
        settings.credential_grace_s,
        settings.vault_token_period_s,
        ticket_public_key=settings.ticket_public_key,
    )
    vault.write("secret/data/airlock-tests/api", {"data": {"key": "kv-" + uuid.uuid4().hex}})
    vault.write("secret/data/airlock-tests/upstream", {"data": {"token": "up-" + uuid.uuid4().hex}})
    return vault


@pytest.fixture(scope="session")
def credentials(settings: Settings, store: Store, vault: Vault) -> Iterator[Credentials]:
    credentials = wiring.credentials(settings, store)
    yield credentials
    credentials.endpoints.shutdown()


@pytest.fixture
def executor(
    settings: Settings, store: Store, runtime: DockerRuntime, credentials: Credentials
) -> Executor:
    return Executor(settings, store, runtime, credentials=credentials)


@pytest.fixture(autouse=True)
def no_leaked_containers(request: pytest.FixtureRequest, settings: Settings) -> Iterator[None]:
    """After every test that touched Docker, no container of this session may remain."""
    yield
    if "runtime" not in request.fixturenames and "worker" not in request.fixturenames:
        return
    runtime: DockerRuntime = request.getfixturevalue("runtime")
    deadline = time.monotonic() + 10
    left = runtime.list_managed(settings.namespace)
    while left and "worker" in request.fixturenames and time.monotonic() < deadline:
        time.sleep(0.1)  # a worker may still be finishing a teardown it was told about
        left = runtime.list_managed(settings.namespace)
    for container in left:
        runtime.remove(container.id)
    assert not left, f"containers left behind: {[c.task_id for c in left]}"


def airlock_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AIRLOCK_NAMESPACE=settings.namespace,
        AIRLOCK_QUEUE=settings.queue,
        AIRLOCK_STOP_GRACE_S=str(settings.stop_grace_s),
        REDIS_URL=settings.redis_url,
        # Components connect as the session's Redis user (tests/test_redis_acl.py runs them
        # on their own users, scoped to a namespace of its own).
        AIRLOCK_REDIS_URL_API="",
        AIRLOCK_REDIS_URL_WORKER="",
        AIRLOCK_REDIS_URL_GATEWAY="",
        AIRLOCK_REDIS_URL_OPS="",
        # ... and with the session's Vault token (test_vault_approle.py runs them on their
        # own AppRoles).
        AIRLOCK_VAULT_APPROLE_WORKER="",
        AIRLOCK_VAULT_APPROLE_GATEWAY="",
        AIRLOCK_VAULT_APPROLE_API="",
        AIRLOCK_AGENTS_DIR=str(settings.agents_dir),
        AIRLOCK_POLICY_DIR=str(settings.policy_dir),
        AIRLOCK_CALLERS_FILE=str(settings.callers_file or ""),
        # The CLI reads and submits directly (the operator's mode) unless a test says.
        AIRLOCK_API_URL="",
        AIRLOCK_ENDPOINT_DIR=str(settings.endpoint_dir),
        AIRLOCK_BROKER_URL=settings.broker_url or "",
        # Tests create bare containers on purpose; only an explicit gc may reap them.
        AIRLOCK_REAP_PERIOD_S="3600",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def running(
    settings: Settings, *argv: str, log: str | None = None, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """An `airlock` process (worker, beat, gateway) for the test; stopped on the way out.

    With `log`, its output goes to .airlock/log/<log>.log for a look after a failure.
    """
    sink = open(ROOT / ".airlock" / "log" / f"{log}.log", "wb") if log else None  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *argv, "--loglevel", "WARNING"],
        env=airlock_env(settings, **env),
        stdout=sink or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if sink else subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if sink:
            sink.close()


@pytest.fixture(scope="session")
def worker(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    vault: Vault,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `airlock worker` process serving this session's queue."""
    tmp = str(tmp_path_factory.mktemp("worker"))
    with running(
        settings, "worker", "--concurrency", "4", log=f"worker-{settings.namespace}", TMPDIR=tmp
    ) as proc:
        yield proc


def airlock(
    settings: Settings, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the `airlock` command as a user would, in this session's namespace."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=airlock_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
