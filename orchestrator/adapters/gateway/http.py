"""HTTP plumbing of the gateway: framing checks, answers, resolution, checked connects.

Nothing here decides policy; it asks the task's ProxyPolicy and the pure decision core.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.adapters.gateway.addresses import IPAddress, as_ip
from orchestrator.adapters.gateway.decide import Target, Verdict
from orchestrator.adapters.gateway.link import Link
from orchestrator.adapters.gateway.mcp import ToolSchemas
from orchestrator.core.grant import CompiledGrant

log = logging.getLogger(__name__)
MAX_HEAD = 16 * 1024
IDLE_TIMEOUT_S = 60.0
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authorization",
    b"proxy-connection",
    b"proxy-authenticate",
    b"te",
    b"trailer",
    b"upgrade",
}


class ProxyPolicy(Protocol):
    """What the shell needs to know about the task whose socket it serves."""

    grant: CompiledGrant
    tool_schemas: ToolSchemas  # the input schemas of its MCP tools, as listed to it

    def authenticate(self, header: str | None) -> str | None:
        """None if the proxy credentials name this live task, else why not."""

    def decide(self, target: Target) -> Verdict:
        """The grant's verdict on a request (before DNS)."""

    def granted_tunnel(self, authority: str) -> tuple[str, int] | None:
        """A directly granted address (a database), bypassing the egress rules."""

    def audit(self, record: dict[str, Any]) -> None:
        """Record one decision, allowed or denied."""

    def count_request(self) -> str | None:
        """Count one more request of the task; why not, once it is over its limit."""

    def at_door(self) -> str | None:
        """Why a new connection is refused before anything is read (a task over its
        request rate), counted as a refused request; None to serve it."""

    def tunnel(self, delta: int) -> str | None:
        """Open (+1) or close (-1) a tunnel; why not, when the task has too many open."""

    def relayed(self, count: int) -> str | None:
        """Count bytes relayed for the task; why no more, once it is over its budget."""

    def credential(self, name: str) -> str | None:
        """The real value behind an injection's placeholder (held by the gateway only)."""


@dataclass
class Exchange:
    """The audit facts of one request, filled in as it goes."""

    method: str
    host: str = ""
    port: int = 0
    path: str | None = None
    scheme: str = "http"  # https: inside an intercepted tunnel (CONNECT: the tunnel's)
    decision: str = "deny"
    rule: str = ""
    reason: str = ""
    status: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    # The credential the gateway added upstream (its name), if any.
    injected: str | None = None
    started: float = field(default_factory=time.monotonic)

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "scheme": self.scheme,
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "status": self.status,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 2),
            **({"injected": self.injected} if self.injected else {}),
        }


class Refused(Exception):
    def __init__(
        self, status: int, rule: str, reason: str, headers: list[tuple[str, str]] | None = None
    ):
        self.status, self.rule, self.reason = status, rule, reason
        self.headers = headers or []
        super().__init__(reason)


def smuggling_problem(head: bytes) -> str | None:
    """Header framing that two HTTP parsers could read differently."""
    ends = head.count(b"\r\n")
    if head.count(b"\n") != ends or head.count(b"\r") != ends:
        return "a line ends in a bare LF or CR (only CRLF is read the same by every parser)"
    names = [line.partition(b":")[0].strip() for line in head.lower().split(b"\r\n")[1:]]
    joined = b"\n".join(names)  # no name holds a line end: one look for whitespace in any
    if b" " in joined or b"\t" in joined:
        return "whitespace in a header name"
    lengths = names.count(b"content-length")
    if lengths > 1:
        return "repeated Content-Length"
    if lengths and b"transfer-encoding" in names:
        return "both Content-Length and Transfer-Encoding"
    return None


class Idle:
    """One idle deadline for a connection, moved on by every read from either of its peers:
    when neither the task nor the upstream has sent anything for IDLE_TIMEOUT_S, the
    connection's task is cancelled and `expired` says why. (One timer per connection, not one
    per read.)"""

    def __init__(self) -> None:
        self.timeout = IDLE_TIMEOUT_S
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.last = self.loop.time()
        self.expired = False
        self._handle: asyncio.TimerHandle | None = self.loop.call_at(
            self.last + self.timeout, self._check
        )

    def touch(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        due = self.last + self.timeout
        if self.loop.time() < due:
            self._handle = self.loop.call_at(due, self._check)
        elif self.task is not None:
            self.expired = True
            self.task.cancel()

    def absorbed(self) -> bool:
        """Whether the cancellation being handled is this deadline's; if so, it is taken back
        (the connection's task goes on, to say why and close)."""
        if not self.expired:
            return False
        self.expired = False
        if self.task is not None:
            self.task.uncancel()
        return True

    def stop(self) -> None:
        """No deadline from now on (an opaque tunnel may stay silent as long as it likes)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def read_chunk(reader: Link, idle: Idle | None = None) -> bytes:
    """The next bytes from a peer (b"" at its end), counted as activity on `idle`."""
    data = await reader.read(65536)
    if idle is not None:
        idle.touch()
    return data


async def read_head(reader: Link, buffer: bytearray, idle: Idle | None) -> bool:
    """Fill `buffer` until it holds a whole request head (or what a lenient parser would
    take for one: a blank line of bare LFs, for smuggling_problem to refuse); False on a
    clean end of stream."""
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        if len(buffer) > MAX_HEAD:
            raise Refused(431, "limits", "request head too large")
        chunk = await read_chunk(reader, idle)
        if not chunk:
            if buffer:
                raise Refused(400, "malformed", "connection closed inside a request head")
            return False
        buffer += chunk
    return True


def refusal(exc: Refused) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
    headers = [("x-airlock-denied", exc.rule), *exc.headers]
    return (
        exc.status,
        {"error": "denied by airlock", "rule": exc.rule, "reason": exc.reason},
        headers,
    )


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The gateway's own resolution: every address the name has, in resolver order."""
    literal = as_ip(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 10)
    except (TimeoutError, OSError):
        return []
    seen: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    return seen


def bearer_token(header: str | None) -> str | None:
    """The JWT from 'Bearer <jwt>' or from 'Basic base64(anything:<jwt>)' (proxy URLs)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip()).decode().partition(":")[2] or None
        except (ValueError, UnicodeDecodeError):
            return None
    return None


ControlHandler = Callable[[str, str, bytes], Awaitable[tuple[int, dict[str, Any]]]]
