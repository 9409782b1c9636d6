"""The warm pool: runners created and started ahead of time, bound to a task only when claimed.

A member is a sealed runner container like any other (no network, hardened, started at the
deployment's default limits) whose runner waits on its own endpoint socket, which speaks for
nobody: it answers only the runner's "what is my task?" and refuses everything else. It holds no
identity and no credentials. A claim binds the member to one task: only then are the grant,
Vault token, secrets and JWT minted, the socket rebound to the task, and the command handed
to the runner. A member serves exactly one task and is removed with it; members older than
the maximum age are recycled; a background thread keeps the pool full. A claim first sets
the member to the task's own cpu, memory and pids ceilings, before its runner learns the
command (gVisor cannot change a running sandbox's ceilings: there, only tasks at the default
limits start warm). Tasks whose image or isolation class no member has take the cold path.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from orchestrator.adapters.gateway.service import Gateway
from orchestrator.adapters.runtime.base import ContainerSpec, Runtime
from orchestrator.adapters.store import Store
from orchestrator.config import TASK_USER, Settings
from orchestrator.core.grant import GrantLimits
from orchestrator.core.ids import MEMBER_PREFIX
from orchestrator.errors import AirlockError

log = logging.getLogger(__name__)
# Isolation classes whose running containers can take new ceilings (runsc has no update).
RESIZABLE = frozenset({"runc"})


@dataclass(frozen=True)
class Member:
    key: str
    image: str
    runtime: str  # isolation class: runc or runsc
    limits: GrantLimits
    container_id: str
    directory: Path
    created_at: float


class WarmPool:
    """This worker's members, per (image, isolation class), refilled in the background."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: Runtime,
        gateway: Gateway,
        sizes: dict[tuple[str, str], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.store, self.runtime, self.gateway = settings, store, runtime, gateway
        self.sizes = {key: n for key, n in sizes.items() if n > 0}
        self.clock = clock
        self.limits = GrantLimits(
            cpus=settings.default_cpus, memory=settings.default_memory, pids=settings.default_pids
        )
        self._ready: dict[tuple[str, str], list[Member]] = {key: [] for key in self.sizes}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- claims ---------------------------------------------------------------------------
    def claim(self, image: str, runtime: str, limits: GrantLimits) -> Member | None:
        """A ready member for a task with this image and isolation class, set to the task's
        limits; None if there is none, or if it could not take those limits (it is removed)."""
        if limits != self.limits and runtime not in RESIZABLE:
            return None
        with self._lock:
            ready = self._ready.get((image, runtime))
            member = ready.pop(0) if ready else None
        if member is None:
            return None
        self.store.pool_forget(member.key)
        self._wake.set()  # refill
        if limits == member.limits:
            return member
        try:
            self.runtime.resize(member.container_id, limits.cpus, limits.memory, limits.pids)
        except AirlockError as exc:
            self._drop(member, f"could not take the task's limits: {exc}")
            return None
        return replace(member, limits=limits)

    def _drop(self, member: Member, why: str) -> None:
        """Remove a member no task may have; what cannot be removed now, the reaper will."""
        try:
            self.discard(member, why)
        except AirlockError as exc:
            log.warning("warm pool: %s left for the reaper: %s", member.key, exc)

    def ready(self) -> int:
        with self._lock:
            return sum(len(members) for members in self._ready.values())

    # -- upkeep ---------------------------------------------------------------------------
    def start(self) -> WarmPool:
        if self.sizes and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="warm-pool")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tend()
            except AirlockError as exc:  # the engine or Redis is away: try again shortly
                log.warning("warm pool: %s", exc)
            except Exception:
                log.exception("warm pool upkeep failed")
            self._wake.wait(self.settings.heartbeat_s)
            self._wake.clear()

    def tend(self) -> None:
        """One round: heartbeat the members, replace the old and the dead, fill up to size."""
        now = self.clock()
        running = {c.id for c in self.runtime.list_managed(self.settings.namespace) if c.running}
        with self._lock:  # only members still ready: a claimed one is its task's now
            members = [m for ready in self._ready.values() for m in ready]
            old = [
                m
                for m in members
                if now - m.created_at > self.settings.pool_max_age_s
                or m.container_id not in running
            ]
            for ready in self._ready.values():
                ready[:] = [m for m in ready if m not in old]
        for member in members:
            if member not in old:
                self.store.heartbeat(member.key, self.settings.heartbeat_s * 3)
        for member in old:
            why = "not running" if member.container_id not in running else "past its maximum age"
            self.discard(member, why)
        for key, size in self.sizes.items():
            while not self._stopping.is_set() and len(self._ready[key]) < size:
                member = self._make(*key)
                with self._lock:
                    self._ready[key].append(member)

    def _make(self, image: str, runtime: str) -> Member:
        key = MEMBER_PREFIX + secrets.token_hex(8)
        created = self.clock()
        self.store.heartbeat(key, self.settings.heartbeat_s * 3)
        directory = self.gateway.open_member(key)
        spec = ContainerSpec(
            task_id=key,
            namespace=self.settings.namespace,
            image=image,
            command=("--pool",),
            env={"AIRLOCK_POOL_MEMBER": key},
            user=TASK_USER,
            cpus=self.limits.cpus,
            memory=self.limits.memory,
            pids=self.limits.pids,
            # The reaper's backstop: no member, however used, outlives this.
            deadline=created + self.settings.pool_max_age_s + self.settings.max_timeout_s + 60,
            agent="",
            runtime=None if runtime == "runc" else runtime,
            endpoint_dir=str(directory),
            runner_dir=str(self.settings.runner_dir),
        )
        container_id = ""
        try:
            container_id = self.runtime.create(spec)
            self.gateway.bind(key, container_id)
            self.runtime.start(container_id)
        except AirlockError:
            if container_id:
                self.runtime.remove(container_id)
            self.gateway.close(key)
            raise
        member = Member(key, image, runtime, self.limits, container_id, directory, created)
        self.store.pool_register(key, {"image": image, "runtime": runtime, "since": created})
        return member

    def discard(self, member: Member, why: str) -> None:
        log.info("warm pool: removing %s (%s)", member.key, why)
        self.store.pool_forget(member.key)
        try:
            self.runtime.remove(member.container_id)
        finally:
            self.gateway.close(member.key)

    def shutdown(self) -> None:
        """Stop refilling and remove every member that no task claimed."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            members = [m for ready in self._ready.values() for m in ready]
            for ready in self._ready.values():
                ready.clear()
        for member in members:
            self._drop(member, "the worker is stopping")


def pool_sizes(settings: Settings, runtimes: frozenset[str]) -> dict[tuple[str, str], int]:
    """The pools this worker keeps: each pool image (the runner image unless
    AIRLOCK_POOL_IMAGES names others) under runc, and under gVisor if present."""
    sizes = {}
    for image in settings.pool_images or (settings.runner_image,):
        sizes[(image, "runc")] = settings.pool_size
        if "runsc" in runtimes:
            sizes[(image, "runsc")] = settings.pool_gvisor_size
    return sizes
