"""Per-task endpoints: one unix socket per task, in a directory mounted into that task only.

The socket is the task's identity: whoever speaks on it speaks for that task and no other.
One asyncio loop (on its own thread) serves every task's socket of this worker; requests
are HTTP/1.1 parsed by llhttp and answered by the task's handler on a thread pool, so a slow
Vault never stalls another task's endpoint.

    POST /v1/bootstrap          the task's JWT and wrapped secrets, exactly once
    POST /v1/wrapping/lookup    {"token"}: where a wrapping token was created
    POST /v1/wrapping/unwrap    {"token"}: unwrap one of this task's wrapped secrets
    GET http://host/...         forward proxy (absolute form), decided against the grant
    CONNECT host:port           a tunnel, decided against the grant: intercepted (the TLS
                                ends here; each request inside is decided), or opaque for a
                                passthrough rule (its TLS server name checked)
Every proxied request must carry the task's JWT (Proxy-Authorization) as a second factor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvloop

from orchestrator.adapters.gateway.addresses import IPAddress
from orchestrator.adapters.gateway.http import ProxyPolicy
from orchestrator.adapters.gateway.interception import LeafCertificates, upstream_context
from orchestrator.adapters.gateway.link import Link
from orchestrator.adapters.gateway.proxy import Session
from orchestrator.core.ids import endpoint_key, is_endpoint_key

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")
_CONTAINER_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
SOCKET_NAME = "airlock.sock"
BACKLOG = 64  # connections a runner may open before the loop accepts them


class Handler(ProxyPolicy, Protocol):
    """A task's endpoint: its control requests, and the policy its proxy traffic obeys."""

    def __call__(
        self, method: str, target: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Answer one JSON control request of the task."""


@dataclass
class Route:
    """One socket, and whom it speaks for: a task, or a warm runner until its claim."""

    key: str
    directory: Path
    server: Future[asyncio.AbstractServer] | None = None  # serving once it is done
    # After a claim: the runner's own endpoint, which still answers its POST /v1/claim (a
    # runner that started after the claim asks only then).
    claim: Handler | None = None
    # The container whose processes may connect (bound after create, before start).
    container: str | None = None
    # Or one host process (a runner outside any container: benchmarks, a debugger).
    process: int | None = None


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a unix socket, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: Any) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return cls(*_UCRED.unpack(raw))

    def containers(self, proc: Path = Path("/proc")) -> set[str]:
        """The container ids in the peer's cgroup paths (none for a host process). Docker's
        cgroupfs (`/docker/<id>`) and systemd (`docker-<id>.scope`) drivers, cgroup v1 and
        v2, and gVisor's sandbox process (it sits in its container's cgroups) all name it."""
        try:
            text = (proc / str(self.pid) / "cgroup").read_text()
        except OSError:
            return set()
        return set(_CONTAINER_ID.findall(text))


class NoEndpoint(LookupError):
    """The gateway serves no endpoint for this key: never opened here, already closed, or
    opened before the gateway restarted (a restart forgets every endpoint)."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the gateway has no endpoint for {key} (closed, or the gateway restarted since)"
        )


class EndpointServer:
    def __init__(
        self,
        root: Path,
        max_connections: int = 64,
        upstream_ca_file: Path | None = None,
        owner: tuple[int, int] = (10001, 10001),
        certificates: LeafCertificates | None = None,
    ) -> None:
        self.root = root
        # The task user: it alone may open a task's directory and socket on this host.
        self.owner = owner
        # How the gateway checks upstreams it speaks TLS to (system roots, and any given).
        self.tls = upstream_context(upstream_ca_file)
        # Leaves for intercepted tunnels (without them, a tunnel that needs one is refused).
        self.certificates = certificates
        self.max_connections = max_connections
        # uvloop: a third less CPU per proxied request than asyncio's own loop.
        self._loop = uvloop.new_event_loop()
        self._sessions: dict[str, set[asyncio.Task[Any]]] = {}
        self.handlers: dict[str, Handler] = {}
        self._routes: dict[str, Route] = {}
        self.own = own_addresses()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="airlock-endpoints"
        )
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def directory(self, key: str) -> Path:
        """The endpoint directory of a task or warm runner. Raises InvalidId for any other
        name (`.`, `..`, a path): nothing but an id is ever made a path here."""
        route = self._routes.get(key)
        return route.directory if route else self.root / endpoint_key(key)

    def open(self, key: str, handler: Handler) -> Path:
        """Serve a socket for `key` (a task, or an unclaimed pool member); the directory to
        mount into its container.

        The socket is bound and listening when this returns (a runner may connect at once);
        the loop starts accepting on it without this thread waiting for it.
        """
        directory = self.directory(key)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SOCKET_NAME
        if path.exists():
            raise FileExistsError(f"{directory} is already served")
        # Only the task's user may enter the directory and open the socket; the kernel then
        # names each peer, and _serve admits only processes of the task's own container.
        os.chown(directory, *self.owner)
        os.chmod(directory, 0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chown(path, *self.owner)
            os.chmod(path, 0o600)
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        route = Route(key, directory)
        self.handlers[key] = handler
        self._routes[key] = route
        route.server = asyncio.run_coroutine_threadsafe(self._accept(route, listener), self._loop)
        return directory

    async def _accept(self, route: Route, listener: socket.socket) -> asyncio.AbstractServer:
        try:
            return await asyncio.get_running_loop().create_unix_server(
                lambda: Link(lambda link: self._serve(route, link)), sock=listener
            )
        except BaseException:
            listener.close()
            raise

    def bind(self, key: str, container_id: str) -> None:
        """The container whose processes may speak on `key`'s socket (its only peers,
        besides this process). Called after the container is created, before it starts."""
        route = self._routes.get(key)
        if route is None:
            raise NoEndpoint(key)
        route.container = container_id

    def allow_process(self, key: str, pid: int) -> None:
        """Let the host process `pid` speak on `key`'s socket as well (no container)."""
        route = self._routes.get(key)
        if route is None:
            raise NoEndpoint(key)
        route.process = pid

    def _peer_refused(self, route: Route, link: Link) -> str | None:
        """Why the peer of a new connection may not speak for the route's task, or None."""
        try:
            peer = Peer.of(link.get_extra_info("socket"))
        except OSError as exc:
            return f"peer credentials unavailable ({exc})"
        if peer.pid in (os.getpid(), route.process):
            return None  # this gateway itself, or the one process it was told to trust
        if route.container is not None and route.container in peer.containers():
            return None
        return (
            f"connection from pid {peer.pid} (uid {peer.uid}), which is not in the task's container"
        )

    def rebind(self, old: str, new: str, handler: Handler) -> Path:
        """A pool member's socket now speaks for task `new`, with that task's handler.

        Connections opened before keep the handler they started with (the member's own
        wait for its claim); every later one gets the task's.
        """
        route = self._routes.pop(old)
        route.key, route.claim = new, self.handlers.pop(old)
        self._routes[new] = route
        self._sessions[new] = self._sessions.pop(old, set())
        self.handlers[new] = handler
        return route.directory

    def close(self, key: str) -> bool:
        """Stop serving the task and remove its directory; False if there was none.

        The socket's path is gone when this returns (no one can connect any more); the loop
        closes the listener and cuts the task's open connections on its own time.
        """
        if not is_endpoint_key(key):
            log.warning("endpoint close refused for %r: not a task id", key[:80])
            return False
        directory = self.directory(key)
        route = self._routes.pop(key, None)
        handler = self.handlers.pop(key, None)
        finish = getattr(handler, "finish", None)
        if finish is not None:
            finish()
        if route is not None and route.server is not None:
            sessions = self._sessions.pop(key, set())
            self._loop.call_soon_threadsafe(_stop, route.server, sessions)
        existed = remove_endpoint_directory(directory)
        return route is not None or existed

    def stale(self, live: Callable[[str], bool]) -> list[str]:
        """Endpoint directories on disk whose task is not live (left by a crashed worker)."""
        return stale_endpoints(self.root, live)

    async def _serve(self, route: Route, link: Link) -> None:
        task_id = route.key
        handler = self.handlers.get(task_id)
        if handler is None:  # closed while this connection was accepted
            link.close()
            return
        refused = self._peer_refused(route, link)
        if refused is not None:
            log.warning("endpoint %s: refused a local peer: %s", task_id, refused)
            handler.audit({"method": "?", "decision": "deny", "rule": "peer", "reason": refused})
            link.close()
            return
        over = handler.at_door()
        if over is not None:  # flooding: cut before anything is parsed
            self._refuse_at_door(handler, link, over)
            return
        current = asyncio.current_task()
        sessions = self._sessions.setdefault(task_id, set())
        if len(sessions) >= self.max_connections:
            over = f"more than {self.max_connections} connections at once"
            self._refuse_at_door(handler, link, over)
            return
        if current is not None:
            sessions.add(current)

        async def control(method: str, target: str, body: bytes) -> tuple[int, dict[str, Any]]:
            if route.claim is not None and target == "/v1/claim":
                return await self._control(route.claim, method, target, body)
            return await self._control(handler, method, target, body)

        try:
            await Session(
                link, control, handler, lambda: self.own, self.tls, self.certificates
            ).run()
        except asyncio.CancelledError:
            link.close()  # the task ended: its open tunnels are cut
        finally:
            if current is not None:
                sessions.discard(current)

    async def _control(
        self, handler: Handler, method: str, target: str, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """One JSON control request, answered by the handler on the thread pool."""
        waiting = getattr(handler, "answer", None)  # an unclaimed warm runner's endpoint
        if waiting is not None:
            answer: tuple[int, dict[str, Any]] = await waiting(method, target)
            return answer
        try:
            document = json.loads(body) if body else {}
        except json.JSONDecodeError:
            return 400, {"error": "body is not JSON"}
        if not isinstance(document, dict):
            return 400, {"error": "body must be a JSON object"}
        try:
            return await self._loop.run_in_executor(None, handler, method, target, document)
        except Exception as exc:  # a failing handler must not take the loop down
            log.exception("endpoint handler failed")
            return 500, {"error": f"internal error: {exc.__class__.__name__}"}

    def _refuse_at_door(self, handler: Handler, link: Link, why: str) -> None:
        handler.audit({"method": "?", "decision": "deny", "rule": "limits", "reason": why})
        link.write(
            b"HTTP/1.1 429 Too Many Requests\r\nx-airlock-denied: limits\r\n"
            b"content-length: 0\r\nconnection: close\r\n\r\n"
        )
        link.close()

    def shutdown(self, settle: Callable[[], Awaitable[None]] | None = None) -> None:
        """Close every task's endpoint and stop the loop, once `settle` (a coroutine run on
        the loop, for example the audit writer's last batch) has returned or 15 s passed."""
        for task_id in list(self._routes):
            self.close(task_id)
        if settle is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_settle(settle), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        with contextlib.suppress(OSError):  # an empty root goes too (a stopped host is bare)
            self.root.rmdir()


async def _settle(settle: Callable[[], Awaitable[None]]) -> None:
    await asyncio.sleep(0.05)  # the cut connections' last audit lines are submitted first
    await settle()


def _stop(server: Future[asyncio.AbstractServer], sessions: set[asyncio.Task[Any]]) -> None:
    """On the loop: close a listener (once it is serving) and cancel its connections."""

    def close(done: Future[asyncio.AbstractServer]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    server.add_done_callback(close)
    for session in sessions:
        session.cancel()


def stale_endpoints(root: Path, live: Callable[[str], bool]) -> list[str]:
    """The keys of endpoint directories under `root` whose task is not live; a directory
    whose name is not a task id or a runner's key is not ours and is never listed."""
    if not root.is_dir():
        return []
    return [
        p.name
        for p in root.iterdir()
        if p.is_dir() and is_endpoint_key(p.name) and not live(p.name)
    ]


def remove_endpoint_directory(directory: Path) -> bool:
    """Remove an endpoint directory: its socket, then the directory if that left it empty
    (never a tree: what else is in it stays, and says so in the log). False if none."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / SOCKET_NAME)
    try:
        os.rmdir(directory)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("endpoint directory %s left in place: %s", directory, exc)
        return True


def own_addresses() -> frozenset[IPAddress]:
    """Every address of this host (the gateway must never proxy a task to its own host)."""
    found: set[IPAddress] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for previous, line in itertools.pairwise(lines):
            if "/32 host LOCAL" in line:
                found.add(ipaddress.ip_address(previous.split()[-1]))
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(ipaddress.ip_address(":".join(raw[i : i + 4] for i in range(0, 32, 4))))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)
