"""The Docker implementation of the runtime seam. The only module that imports `docker`."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar
from urllib.parse import quote, urlsplit

import docker
import docker.errors
import requests
from opentelemetry.trace import SpanKind

from orchestrator.adapters import http1, telemetry
from orchestrator.adapters.retry import ride_out
from orchestrator.adapters.runtime.base import (
    LABEL_AGENT,
    LABEL_DEADLINE,
    LABEL_MANAGED,
    LABEL_NAMESPACE,
    LABEL_OWNER,
    LABEL_TASK,
    ContainerSpec,
    ExitStatus,
    ManagedContainer,
)
from orchestrator.config import proxies_in_env
from orchestrator.errors import ImageNotFound, RuntimeFailure, ServiceUnavailable

# A span's name holds the route, not the container: /containers/{id}/start.
_CONTAINER_ID = re.compile(r"/containers/(?!create$)[^/]+")
P = ParamSpec("P")
R = TypeVar("R")
WORKSPACE = "/workspace"
# The task's credentials (JWT, unwrapped secrets) live on this tmpfs, never on disk.
CREDENTIALS = "/run/airlock"
ENDPOINT = "/run/airlock-endpoint"
# The runner, mounted from the host: PID 1 of every task container, whatever its image.
RUNNER_DIR = "/opt/airlock"
RUNNER = RUNNER_DIR + "/airlock-runner"
# Docker Engine 20.10, the oldest engine supported; newer engines all speak it.
API_VERSION = "1.41"
DEFAULT_ENGINE = "unix:///var/run/docker.sock"


def container_config(spec: ContainerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The create arguments and host config of a sealed task container, as plain data.

    No network but loopback, read-only root, every capability dropped, no privilege
    escalation, an unprivileged user, hard pid/memory/cpu ceilings, scratch space only on
    size-capped tmpfs (which counts against the memory ceiling), and no engine-side log file.
    """
    labels = {
        **spec.labels,
        LABEL_MANAGED: "1",
        LABEL_NAMESPACE: spec.namespace,
        LABEL_TASK: spec.task_id,
        LABEL_DEADLINE: f"{spec.deadline:.3f}",
        LABEL_AGENT: spec.agent,
    }
    if spec.on_behalf_of:
        labels[LABEL_OWNER] = spec.on_behalf_of
    uid, _, gid = spec.user.partition(":")
    owner = f"uid={uid},gid={gid or uid},mode=0700"
    tmpfs_opts = f"rw,nosuid,nodev,size={spec.scratch_bytes},{owner}"
    host: dict[str, Any] = {
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": spec.pids,
        "mem_limit": spec.memory,
        "memswap_limit": spec.memory,
        "nano_cpus": int(spec.cpus * 1e9),
        "ipc_mode": "private",
        "tmpfs": {
            "/tmp": tmpfs_opts + ",noexec",
            WORKSPACE: tmpfs_opts,
            CREDENTIALS: f"rw,nosuid,nodev,noexec,size=1048576,{owner}",
        },
        "ulimits": [docker.types.Ulimit(name="nofile", soft=1024, hard=1024)],
        "log_config": docker.types.LogConfig(type="none"),
    }
    if spec.runtime:
        host["runtime"] = spec.runtime
    binds: dict[str, dict[str, str]] = {}
    if spec.endpoint_dir:
        binds[spec.endpoint_dir] = {"bind": ENDPOINT, "mode": "ro"}
    if spec.runner_dir:
        binds[spec.runner_dir] = {"bind": RUNNER_DIR, "mode": "ro"}
        # The runner answers names on loopback and serves the task's TLS ports there (for
        # clients that ignore proxy settings); binding ports below 1024 inside the
        # container's own network namespace, which has nothing but loopback, needs this.
        host["dns"] = ["127.0.0.1"]
        host["sysctls"] = {"net.ipv4.ip_unprivileged_port_start": "0"}
    if binds:
        host["binds"] = binds
    create: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "environment": dict(spec.env),
        "user": spec.user,
        "working_dir": WORKSPACE,
        "labels": labels,
        "hostname": "airlock",
        "network_disabled": True,
        "stdin_open": False,
        "tty": False,
    }
    if spec.runner_dir:
        create["entrypoint"] = [RUNNER]
    return create, host


class EngineRefused(Exception):
    """The engine answered a hot-path call with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _translate(method: Callable[P, R]) -> Callable[P, R]:
    """Map docker-py and transport errors onto Airlock's error tree.

    A runtime with `ride_out_s` repeats a call that could not even connect (the engine is
    restarting: nothing was sent, so repeating is safe) until the engine is back or that
    long has passed.
    """

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        seconds = float(getattr(args[0], "ride_out_s", 0.0))
        try:
            return ride_out(lambda: method(*args, **kwargs), seconds, http1.never_sent)
        except (
            requests.ConnectionError,
            docker.errors.DockerException,
            EngineRefused,
            OSError,
        ) as exc:
            raise _translated(exc) from exc

    return wrapper


def _translated(exc: Exception) -> Exception:
    if isinstance(exc, EngineRefused):
        return RuntimeFailure(f"docker: {exc.message}")
    if isinstance(exc, docker.errors.ImageNotFound):
        return ImageNotFound(f"image not found: {exc.explanation}")
    if isinstance(exc, docker.errors.APIError):
        return RuntimeFailure(f"docker: {exc.explanation or exc}")
    if isinstance(exc, OSError) and not isinstance(exc, http1.ProtocolError):
        return ServiceUnavailable("docker", exc.strerror or str(exc) or type(exc).__name__)
    return ServiceUnavailable("docker", str(exc))


STREAMS = {1: "stdout", 2: "stderr"}


def _message(answer: http1.Response) -> str:
    """What the engine said went wrong."""
    try:
        return str(answer.json().get("message") or answer.text).strip()
    except ValueError:
        return answer.text.strip()


def _frames(stream: http1.Stream) -> Iterator[list[tuple[str, bytes]]]:
    """The engine's multiplexed output, in batches: each batch is every whole frame that had
    arrived when it was read. A frame is a stream byte, three zero bytes, a big-endian
    length, then that many bytes. Ends when the container's output does."""
    buffer = bytearray()
    try:
        while True:
            data = stream.reader.read1(65536)
            if not data:
                return
            buffer += data
            batch, at = [], 0
            while len(buffer) - at >= 8:
                end = at + 8 + int.from_bytes(buffer[at + 4 : at + 8], "big")
                if len(buffer) < end:
                    break
                if end > at + 8 and buffer[at] in STREAMS:
                    batch.append((STREAMS[buffer[at]], bytes(buffer[at + 8 : end])))
                at = end
            del buffer[:at]
            if batch:
                yield batch
    except (OSError, ValueError):
        return  # the stream was cut (container removed under us); the output ends here
    finally:
        stream.close()


class DockerRuntime:
    """The engine, through docker-py, except the four calls every task makes (create, start,
    wait, remove): those go through `http1`, at a sixth of docker-py's CPU per call.

    Engine addresses: unix:// and tcp:// (plain HTTP), as DOCKER_HOST names them.
    """

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float = 60,
        max_pool_size: int = 10,
        ride_out_s: float = 0.0,
    ) -> None:
        self.ride_out_s = ride_out_s
        where = urlsplit(base_url or DEFAULT_ENGINE)
        self._server: dict[str, str | int] = (
            {"server.address": where.path, "network.transport": "unix"}
            if where.scheme == "unix"
            else {"server.address": where.hostname or "", "server.port": where.port or 2375}
        )
        try:
            self.engine = http1.Client(base_url or DEFAULT_ENGINE, timeout=timeout)
        except ValueError as exc:
            raise ServiceUnavailable("docker", f"{exc}: use unix:// or tcp://") from None
        # A pinned API version: no round trip at construction, so an engine that is down
        # surfaces as ServiceUnavailable on the first call, where the task can record it.
        try:
            self.api = docker.APIClient(
                base_url=base_url or DEFAULT_ENGINE,
                version=API_VERSION,
                timeout=timeout,
                max_pool_size=max_pool_size,
            )
            # The engine's socket needs no proxy: do not search the environment per call.
            self.api.trust_env = proxies_in_env() and not self.api.base_url.startswith(
                "http+docker://localhost"
            )
        except docker.errors.DockerException as exc:
            raise ServiceUnavailable("docker", str(exc)) from exc

    @_translate
    def ping(self) -> None:
        self.api.ping()

    @_translate
    def runtimes(self) -> frozenset[str]:
        return frozenset(self.api.info().get("Runtimes") or {"runc": {}})

    def _call(self, method: str, path: str, body: Any = None, patient: bool = False) -> Any:
        """One engine call on the hot path, as a client span; its JSON answer (`patient`: no
        timeout, for a wait). Raises EngineRefused, OSError."""
        route = _CONTAINER_ID.sub("/containers/{id}", path.partition("?")[0])
        with telemetry.tracer().start_as_current_span(
            f"docker {method} {route}",
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.path": route, **self._server},
        ) as span:
            path = f"/v{API_VERSION}{path}"
            if patient:
                answer = self.engine.request(method, path, body, timeout=None)
            else:
                answer = self.engine.request(method, path, body)
            span.set_attribute("http.response.status_code", answer.status_code)
            if answer.status_code >= 400:
                span.set_attribute("error.type", str(answer.status_code))
                raise EngineRefused(answer.status_code, _message(answer))
            return answer.json() if answer.content else None

    @_translate
    def create(self, spec: ContainerSpec) -> str:
        create, host = container_config(spec)
        config = self.api.create_container_config(
            host_config=self.api.create_host_config(**host), **create
        )
        try:
            return str(self._call("POST", "/containers/create", config)["Id"])
        except EngineRefused as exc:
            if exc.status == 404:
                raise ImageNotFound(f"image not found: {exc.message}") from None
            raise

    @_translate
    def attach(self, container_id: str) -> Iterator[list[tuple[str, bytes]]]:
        path = f"/v{API_VERSION}/containers/{quote(container_id)}/attach?stdout=1&stderr=1&stream=1"
        answer, stream = self.engine.upgrade("POST", path)
        if stream is None:
            raise EngineRefused(answer.status_code, _message(answer))
        return _frames(stream)

    @_translate
    def start(self, container_id: str) -> None:
        self._call("POST", f"/containers/{quote(container_id)}/start")

    @_translate
    def wait(self, container_id: str) -> ExitStatus:
        result = self._call("POST", f"/containers/{quote(container_id)}/wait", patient=True)
        code = int(result.get("StatusCode", -1))
        oom = False
        if code == 137:  # SIGKILL: the kernel's OOM killer or our own stop
            state = self.api.inspect_container(container_id)["State"]
            oom = bool(state.get("OOMKilled"))
        return ExitStatus(code, oom)

    @_translate
    def resize(self, container_id: str, cpus: float, memory: int, pids: int) -> None:
        limits = {
            "NanoCpus": int(cpus * 1e9),
            "Memory": memory,
            "MemorySwap": memory,
            "PidsLimit": pids,
        }
        self._call("POST", f"/containers/{quote(container_id)}/update", limits)

    @_translate
    def stop(self, container_id: str, grace_s: float) -> None:
        try:
            self.api.stop(container_id, timeout=max(round(grace_s), 0))
        except docker.errors.NotFound:
            pass

    @_translate
    def remove(self, container_id: str) -> bool:
        try:
            self._call("DELETE", f"/containers/{quote(container_id)}?v=1&force=1")
        except EngineRefused as exc:
            if exc.status == 404 or "already in progress" in exc.message:
                return False
            raise
        return True

    @_translate
    def list_managed(self, namespace: str) -> list[ManagedContainer]:
        found = self.api.containers(
            all=True, filters={"label": [f"{LABEL_MANAGED}=1", f"{LABEL_NAMESPACE}={namespace}"]}
        )
        return [
            ManagedContainer(
                id=c["Id"],
                task_id=c["Labels"].get(LABEL_TASK, ""),
                namespace=namespace,
                deadline=float(c["Labels"].get(LABEL_DEADLINE) or 0),
                running=c.get("State") == "running",
            )
            for c in found
        ]
