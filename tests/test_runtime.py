"""The container a task gets: its create arguments as data, and what the engine really made."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.adapters.runtime.base import ContainerSpec
from orchestrator.adapters.runtime.docker_engine import DockerRuntime, container_config
from orchestrator.config import TASK_USER, Settings
from orchestrator.errors import ServiceUnavailable


def make_spec(settings: Settings, **overrides: object) -> ContainerSpec:
    fields: dict[str, object] = dict(
        task_id=str(uuid.uuid4()),
        namespace=settings.namespace,
        image=settings.runner_image,
        command=("sleep", "30"),
        env={"A": "1"},
        user=TASK_USER,
        cpus=0.5,
        memory=64 << 20,
        pids=32,
        deadline=time.time() + 60,
        agent="tester",
        on_behalf_of="alice",
    )
    fields.update(overrides)
    return ContainerSpec(**fields)  # type: ignore[arg-type]


def test_create_arguments_are_sealed(settings: Settings) -> None:
    spec = make_spec(settings)
    create, host = container_config(spec)
    assert host["network_mode"] == "none" and create["network_disabled"] is True
    assert host["read_only"] is True
    assert host["cap_drop"] == ["ALL"]
    assert host["security_opt"] == ["no-new-privileges:true"]
    assert (host["pids_limit"], host["mem_limit"], host["memswap_limit"]) == (
        32,
        64 << 20,
        64 << 20,
    )
    assert host["nano_cpus"] == 500_000_000
    assert set(host["tmpfs"]) == {"/tmp", "/workspace", "/run/airlock"}
    assert (
        "noexec" in host["tmpfs"]["/run/airlock"] and "mode=0700" in host["tmpfs"]["/run/airlock"]
    )
    assert "binds" not in host  # no endpoint asked for: nothing from the host is mounted
    assert "noexec" in host["tmpfs"]["/tmp"]
    assert create["user"] == TASK_USER and not create["user"].startswith("0")
    assert create["labels"]["airlock.task_id"] == spec.task_id
    assert create["labels"]["airlock.on_behalf_of"] == "alice"
    assert float(create["labels"]["airlock.deadline"]) == round(spec.deadline, 3)
    assert host["log_config"]["Type"] == "none"
    assert "runtime" not in host


def test_engine_applies_every_setting(settings: Settings, runtime: DockerRuntime) -> None:
    spec = make_spec(settings)
    container_id = runtime.create(spec)
    try:
        info = runtime.api.inspect_container(container_id)
        host = info["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
        assert host["SecurityOpt"] == ["no-new-privileges:true"]
        assert host["Privileged"] is False
        assert (host["PidsLimit"], host["Memory"], host["MemorySwap"]) == (32, 64 << 20, 64 << 20)
        assert host["NanoCpus"] == 500_000_000
        assert info["Config"]["User"] == TASK_USER
        assert info["Config"]["Labels"]["airlock.task_id"] == spec.task_id
        assert not info["Mounts"] or all(m["Type"] != "bind" for m in info["Mounts"])
        listed = runtime.list_managed(settings.namespace)
        assert [c.task_id for c in listed if c.id == container_id] == [spec.task_id]
    finally:
        assert runtime.remove(container_id) is True
    assert runtime.remove(container_id) is False
    assert all(c.id != container_id for c in runtime.list_managed(settings.namespace))


# docker-py leaves the socket of a failed connect to the garbage collector.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_worker_runtime_rides_out_an_engine_restart(tmp_path: Path) -> None:
    """Calls that could not connect are repeated while the engine comes back (a restart)."""
    socket_path = tmp_path / "docker.sock"
    impatient = DockerRuntime(f"unix://{socket_path}")
    patient = DockerRuntime(f"unix://{socket_path}", ride_out_s=20)
    with pytest.raises(ServiceUnavailable):
        impatient.ping()  # nothing there, and no patience: at once
    back = threading.Timer(1.0, lambda: socket_path.symlink_to("/var/run/docker.sock"))
    back.start()
    try:
        patient.ping()  # the engine "comes back" a second later
    finally:
        back.join()
        del impatient, patient
        gc.collect()  # while this test's warning filter holds
    assert socket_path.is_symlink()


def test_engine_addresses_other_than_unix_and_tcp_are_refused_clearly() -> None:
    with pytest.raises(ServiceUnavailable, match=r"ssh://.*use unix:// or tcp://"):
        DockerRuntime("ssh://engine.example")


class _Pieces:
    """A stream whose reads return the engine's bytes in awkward pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.reader = self
        self.pieces = pieces
        self.closed = False

    def read1(self, _size: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    def close(self) -> None:
        self.closed = True


def test_output_frames_are_reassembled_across_reads_and_batched() -> None:
    from orchestrator.adapters.runtime.docker_engine import _frames

    def frame(stream: int, data: bytes) -> bytes:
        return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data

    wire = frame(1, b"hello ") + frame(2, b"oops\n") + frame(1, b"") + frame(0, b"stdin?")
    wire += frame(1, b"x" * 70000)
    # Cut mid-header, mid-payload, and inside the big frame.
    pieces = [wire[:3], wire[3:20], wire[20:40], wire[40:50000], wire[50000:]]
    stream = _Pieces(pieces)
    batches = list(_frames(stream))  # type: ignore[arg-type]
    flat = [chunk for batch in batches for chunk in batch]
    assert flat == [("stdout", b"hello "), ("stderr", b"oops\n"), ("stdout", b"x" * 70000)]
    assert batches[0] == [("stdout", b"hello ")]  # what had arrived by then, no more
    assert stream.closed
