"""The container runtime seam: the one narrow interface over a container engine.

Everything above it speaks in these types; only an implementation module (docker.py)
imports an engine library, and it translates that library's errors into ours.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Every container Airlock creates carries these labels; the reaper finds orphans by them.
LABEL_MANAGED = "airlock.managed"
LABEL_NAMESPACE = "airlock.namespace"
LABEL_TASK = "airlock.task_id"
LABEL_DEADLINE = "airlock.deadline"
LABEL_AGENT = "airlock.agent"
LABEL_OWNER = "airlock.on_behalf_of"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one sealed task container."""

    task_id: str
    namespace: str
    image: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    user: str
    cpus: float
    memory: int
    pids: int
    deadline: float
    agent: str
    on_behalf_of: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    scratch_bytes: int = 64 << 20
    runtime: str | None = None
    # The task's endpoint directory on the host, mounted read-only into this container only.
    endpoint_dir: str | None = None
    # The runner's directory on the host, mounted read-only at /opt/airlock; its binary is
    # the entrypoint. None: the image's own entrypoint (raw baselines).
    runner_dir: str | None = None


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    oom_killed: bool = False


@dataclass(frozen=True)
class ManagedContainer:
    id: str
    task_id: str
    namespace: str
    deadline: float
    running: bool


class Runtime(Protocol):
    def ping(self) -> None:
        """Raises ServiceUnavailable when the engine does not answer."""

    def runtimes(self) -> frozenset[str]:
        """Names of the OCI runtimes the engine offers (isolation classes it can run)."""

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the container; returns its id.

        Raises ImageNotFound, RuntimeFailure, ServiceUnavailable.
        """

    def attach(self, container_id: str) -> Iterator[list[tuple[str, bytes]]]:
        """Stream batches of ("stdout"|"stderr", bytes) until the container exits: each
        batch is what had arrived when it was read, so a chatty command costs few writes.

        Attach before start so that no output is missed and none needs storing by the engine.
        """

    def start(self, container_id: str) -> None:
        """Raises RuntimeFailure, ServiceUnavailable."""

    def wait(self, container_id: str) -> ExitStatus:
        """Block until the container has exited and report how."""

    def resize(self, container_id: str, cpus: float, memory: int, pids: int) -> None:
        """Set a container's cpu, memory (swap included) and pids ceilings, running or not.

        Raises RuntimeFailure (the OCI runtime cannot, or memory is below current use),
        ServiceUnavailable.
        """

    def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; a container already gone is not an error."""

    def remove(self, container_id: str) -> bool:
        """Force-remove with its anonymous volumes; False if it was already gone."""

    def list_managed(self, namespace: str) -> list[ManagedContainer]:
        """Every container Airlock created in `namespace`, running or not."""
