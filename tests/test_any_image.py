"""Any image: the runner comes from outside (a static binary on a read-only mount), so a task
image with no Python, no glibc and no musl (Debian's static busybox and nothing else) runs
sealed, bootstrapped and relayed exactly as the runner image does: under runc and gVisor,
cold and claimed from a warm pool."""

from __future__ import annotations

import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.adapters.runtime.base import Runtime
from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.lifecycle import TaskState
from orchestrator.task.credentials import Credentials
from orchestrator.task.executor import Executor
from orchestrator.task.pool import WarmPool
from tests.upstream import HTTP_PORT, Upstreams

pytestmark = pytest.mark.docker
S = TaskState
BUSYBOX = "airlock-busybox:latest"
IMAGES = {
    "runner": "airlock-runner:latest",
    "tools": "airlock-runner-tools:latest",
    "busybox": BUSYBOX,
}
AGENTS = {"runc": "web", "runsc": "web-gvisor"}

# What the runner contract means from inside, checked with whatever the image has (busybox's
# applets, curl, or Python): the task user, a read-only root, the mounted runner as PID 1,
# its bootstrap (JWT, CA bundle) and its proxy relay through the gateway.
CONTRACT = rf"""
get() {{
  if command -v wget >/dev/null; then wget -q -O - "$1"
  elif command -v curl >/dev/null; then curl -sf "$1"
  else python3 -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=10).read().decode())' "$1"
  fi
}}
direct() {{
  if command -v nc >/dev/null; then nc -w 3 127.0.0.1 {HTTP_PORT} </dev/null
  else bash -c 'exec 3<>/dev/tcp/127.0.0.1/{HTTP_PORT}'
  fi
}}
echo "uid $(id -u):$(id -g)"
touch /etc/probe 2>/dev/null && echo "root: writable" || echo "root: read-only"
touch /opt/airlock/probe 2>/dev/null && echo "runner: writable" || echo "runner: read-only"
[ -x /opt/airlock/airlock-runner ] && echo "runner: mounted"
command -v python3 >/dev/null || echo "python: none"
ls /lib*/libc.so* /lib*/*/libc.so* /lib*/ld-musl* >/dev/null 2>&1 || echo "libc: none"
echo "home $HOME"
echo "pid1 $(tr '\0' ' ' </proc/1/cmdline)"
echo "token $(cut -d. -f1 "$AIRLOCK_TOKEN_FILE" | head -c 3)"
echo "ca $(grep -c 'BEGIN CERTIFICATE' "$SSL_CERT_FILE")"
get http://127.0.0.1:{HTTP_PORT}/api/contract | grep -o '"path": "[^"]*"'
get http://127.0.0.1:{HTTP_PORT}/admin >/dev/null 2>&1 || echo "admin: refused"
direct 2>/dev/null && echo "direct: connected" || echo "direct: refused"
echo done >/workspace/output/result.txt
"""


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    servers = Upstreams(tmp_path_factory.mktemp("upstream"))
    yield servers
    servers.close()


def logs_of(store: Store, task_id: str) -> str:
    return "".join(text for _, text in store.iter_logs(task_id))


def run_contract(executor: Executor, agent: str, image: str) -> tuple[str, dict[str, Any]]:
    task_id = str(uuid.uuid4())
    state = executor.execute(
        task_id, {"agent": agent, "image": image, "command": ["sh", "-c", CONTRACT]}
    )
    logs = logs_of(executor.store, task_id)
    status = Client(executor.settings).status(task_id)
    assert state is S.SUCCEEDED, (status.get("reason"), logs)
    assert status["grant"]["image"] == image
    return logs, status


def assert_contract(executor: Executor, logs: str, status: dict[str, Any], image: str) -> None:
    expected = [
        "uid 10001:10001",
        "root: read-only",
        "runner: read-only",
        "runner: mounted",
        "home /workspace",
        "pid1 /opt/airlock/airlock-runner ",  # the mounted runner is PID 1
        "token eyJ",  # a JWT, fetched by the runner's bootstrap
        '"path": "/api/contract"',  # the proxy relay, through the gateway
        "admin: refused",
        "direct: refused",  # the container's loopback is its own
    ]
    if image == BUSYBOX:
        expected += ["python: none", "libc: none", "ca 1"]  # the gateway CA, no image roots
    else:
        assert "ca 1\n" not in logs and "ca 0" not in logs  # the image's roots and the CA
    for line in expected:
        assert line in logs, (line, logs)
    assert Client(executor.settings).output(status["id"]) == [("result.txt", b"done\n")]
    assert status["revocation"]["verified"], status["revocation"]
    executor.credentials.audit.flush()
    decisions = {
        (r.get("path"), r["decision"]) for r in AuditLog(executor.store).records(status["id"])
    }
    assert ("/api/contract", "allow") in decisions and ("/admin", "deny") in decisions


def needs(engine: Runtime, isolation: str) -> None:
    if isolation == "runsc" and "runsc" not in engine.runtimes():
        pytest.fail("runsc is not registered with this Docker engine")


@pytest.mark.parametrize("isolation", sorted(AGENTS))
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_image_meets_the_runner_contract_cold(
    executor: Executor, upstreams: Upstreams, image: str, isolation: str
) -> None:
    needs(executor.runtime, isolation)
    logs, status = run_contract(executor, AGENTS[isolation], IMAGES[image])
    assert_contract(executor, logs, status, IMAGES[image])
    assert "warm_runner" not in status
    assert status["grant"]["runtime"] == isolation


@pytest.mark.parametrize("isolation", sorted(AGENTS))
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_image_meets_the_runner_contract_warm(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
    upstreams: Upstreams,
    image: str,
    isolation: str,
) -> None:
    needs(runtime, isolation)
    sizes = {(IMAGES[image], isolation): 1}
    pool = WarmPool(settings, store, runtime, credentials.endpoints, sizes)
    try:
        pool.tend()
        assert pool.ready() == 1
        warm = Executor(settings, store, runtime, credentials=credentials, pool=pool)
        logs, status = run_contract(warm, AGENTS[isolation], IMAGES[image])
        assert "warm_runner" in status, status
        assert_contract(warm, logs, status, IMAGES[image])
    finally:
        pool.shutdown()


SECRETS = r"""
grep -o '"[a-z_]*": *"[^"]*"' "$AIRLOCK_SECRETS_DIR/api-key" | cut -d: -f1 | tr '\n' ' '; echo
db=$AIRLOCK_SECRETS_DIR/reports-db
grep -o '"host": *"[^"]*"' "$db"
port=$(grep -o '"port": *[0-9]*' "$db" | grep -o '[0-9]*$')
# PostgreSQL's SSLRequest: the real server, reached through the runner's local port and
# the gateway's tunnel, answers one byte (N: no TLS offered).
{ printf '\000\000\000\010\004\322\026\057'; sleep 2; } | nc -w 5 127.0.0.1 "$port" | head -c 1 | sed 's/^/postgres answered /'
echo
"""


def test_secrets_and_the_database_tunnel_work_without_python(executor: Executor) -> None:
    task_id = str(uuid.uuid4())
    state = executor.execute(
        task_id, {"agent": "dba", "image": BUSYBOX, "command": ["sh", "-c", SECRETS]}
    )
    logs = logs_of(executor.store, task_id)
    assert state is S.SUCCEEDED, logs
    assert '"host":"127.0.0.1"' in logs  # the local port the runner forwards
    assert "postgres answered N" in logs
    assert logs.split("\n")[0].strip(), logs  # the KV secret's fields, unwrapped
    status = Client(executor.settings).status(task_id)
    assert status["revocation"]["verified"] and status["revocation"]["leases"], status


def elf_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF names a program interpreter (PT_INTERP)."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    kinds = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    assert kinds, "no program headers"
    return 3 in kinds


def test_the_runner_binary_is_static_and_reproducible(settings: Settings, tmp_path: Path) -> None:
    """The mounted runner needs nothing from the image, and the same source builds the same
    bytes."""
    runner = settings.runner_dir / "airlock-runner"
    assert not elf_interpreter(runner.read_bytes())  # no dynamic loader: static
    source = Path(__file__).resolve().parent.parent / "runner_image" / "runner"
    built = subprocess.run(
        [
            "go",
            "build",
            "-trimpath",
            "-buildvcs=false",
            "-ldflags",
            "-s -w -buildid=",
            "-o",
            str(tmp_path / "again"),
            ".",
        ],
        cwd=source,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "CGO_ENABLED": "0",
            "GOCACHE": str(tmp_path / "cache"),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "again").read_bytes() == runner.read_bytes()
