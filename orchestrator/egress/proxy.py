"""The gateway's thin asyncio shell: it moves bytes, and asks the pure core what is allowed.

One client connection carries a sequence of requests (keep-alive). Request heads are
scanned for smuggling (Content-Length with Transfer-Encoding, repeated Content-Length)
before h11 sees them; pipelined requests are refused. Plain HTTP is forwarded in origin
form to exactly the address that was checked; CONNECT becomes a byte tunnel to it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11

from orchestrator.egress.addresses import IPAddress, as_ip
from orchestrator.egress.decide import Target, Verdict, decide_addresses

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

    def authenticate(self, header: str | None) -> str | None:
        """None if the proxy credentials name this live task, else why not."""

    def decide(self, target: Target) -> Verdict:
        """The grant's verdict on a request (before DNS)."""

    def granted_tunnel(self, authority: str) -> tuple[str, int] | None:
        """A directly granted address (a database), bypassing the egress rules."""

    def audit(self, record: dict[str, Any]) -> None:
        """Record one decision, allowed or denied."""


@dataclass
class Exchange:
    """The audit facts of one request, filled in as it goes."""

    method: str
    host: str = ""
    port: int = 0
    path: str | None = None
    decision: str = "deny"
    rule: str = ""
    reason: str = ""
    status: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    started: float = field(default_factory=time.monotonic)

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "status": self.status,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 2),
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
    names = [line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")[1:] if line]
    if any(b" " in name or b"\t" in name for name in names):
        return "whitespace in a header name"
    lengths = names.count(b"content-length")
    if lengths > 1:
        return "repeated Content-Length"
    if lengths and b"transfer-encoding" in names:
        return "both Content-Length and Transfer-Encoding"
    return None


async def read_head(reader: asyncio.StreamReader, buffer: bytearray) -> bool:
    """Fill `buffer` until it holds a whole request head; False on a clean end of stream."""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD:
            raise Refused(431, "limits", "request head too large")
        chunk = await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT_S)
        if not chunk:
            if buffer:
                raise Refused(400, "malformed", "connection closed inside a request head")
            return False
        buffer += chunk
    return True


async def respond(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    payload: dict[str, Any],
    headers: list[tuple[str, str]] | None = None,
) -> None:
    data = json.dumps(payload).encode()
    all_headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
        *(headers or []),
    ]
    writer.write(conn.send(h11.Response(status_code=status, headers=all_headers)) or b"")
    writer.write(conn.send(h11.Data(data=data)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


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


async def connect_checked(
    policy: ProxyPolicy, target: Target, exchange: Exchange, own: Callable[[], frozenset[IPAddress]]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Decide, resolve, check every address, and connect to exactly the checked one."""
    verdict = policy.decide(target)
    exchange.host, exchange.rule, exchange.reason = verdict.host, verdict.rule, verdict.reason
    if not verdict.allowed:
        raise Refused(403, verdict.rule, verdict.reason)
    addresses = await resolve(verdict.host, target.port)
    verdict, chosen = decide_addresses(verdict, addresses, own())
    if chosen is None:
        exchange.rule, exchange.reason = verdict.rule, verdict.reason
        raise Refused(403, verdict.rule, verdict.reason)
    try:
        return await asyncio.wait_for(asyncio.open_connection(str(chosen), target.port), 10)
    except (TimeoutError, OSError) as exc:
        raise Refused(502, "upstream", f"cannot connect to {chosen}:{target.port}: {exc}") from None


def proxy_credentials(request: h11.Request) -> str | None:
    for name, value in request.headers:
        if name == b"proxy-authorization":
            return value.decode("latin-1")
    return None


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


Pipe = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[int]]


async def next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT_S))


async def read_body(conn: h11.Connection, reader: asyncio.StreamReader, limit: int) -> bytes:
    body = b""
    while not isinstance(event := await next_event(conn, reader), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                raise Refused(413, "limits", "request body too large")
    return body


def header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


ControlHandler = Callable[[str, str, bytes], Awaitable[tuple[int, dict[str, Any]]]]


class Session:
    """One client connection on a task's socket."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        control: ControlHandler,
        policy: ProxyPolicy,
        own: Callable[[], frozenset[IPAddress]],
    ) -> None:
        self.reader, self.writer = reader, writer
        self.control, self.policy, self.own = control, policy, own
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    async def run(self) -> None:
        buffer = bytearray()
        try:
            while await read_head(self.reader, buffer):
                head = bytes(buffer[: buffer.index(b"\r\n\r\n")])
                problem = smuggling_problem(head)
                if problem:
                    self.policy.audit(Exchange("?", reason=problem, rule="smuggling").record())
                    raise Refused(400, "smuggling", problem)
                self.conn.receive_data(bytes(buffer))
                buffer.clear()
                request = await next_event(self.conn, self.reader)
                if not await self.dispatch(request):
                    return
                self.conn.start_next_cycle()
                if self.conn.next_event() is not h11.NEED_DATA:
                    raise Refused(400, "pipelining", "pipelined requests are not supported")
        except Refused as exc:
            await self._refuse(exc)
        except (h11.RemoteProtocolError, ValueError) as exc:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self.conn.their_state in (
                h11.IDLE,
                h11.SEND_BODY,
                h11.ERROR,
            ):
                self.policy.audit(
                    Exchange("?", rule="malformed", reason=str(exc), status=400).record()
                )
            await self._refuse(Refused(400, "malformed", f"bad request: {exc}"))
        except (TimeoutError, ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            self.writer.close()

    async def _refuse(self, exc: Refused) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status, payload, headers = refusal(exc)
        try:
            await respond(
                self.conn, self.writer, status, payload, [*headers, ("connection", "close")]
            )
        except (h11.LocalProtocolError, ConnectionError):
            pass

    async def dispatch(self, request: h11.Request) -> bool:
        """Serve one request; whether the connection may carry another."""
        target = request.target.decode("latin-1")
        if request.method == b"CONNECT":
            await self.connect(request, target)
            return False
        if target.startswith("/"):
            body = await read_body(self.conn, self.reader, MAX_HEAD * 4)
            status, payload = await self.control(request.method.decode(), target, body)
            await respond(self.conn, self.writer, status, payload, [("connection", "close")])
            return False
        return await self.forward(request, target)

    def _authenticate(self, request: h11.Request) -> None:
        why = self.policy.authenticate(proxy_credentials(request))
        if why:
            raise Refused(407, "identity", why, [("proxy-authenticate", 'Bearer realm="airlock"')])

    async def forward(self, request: h11.Request, target: str) -> bool:
        method = request.method.decode()
        exchange = Exchange(method)
        try:
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                raise Refused(400, "scheme", "only absolute http:// URLs; use CONNECT for TLS")
            exchange.path = url.path or "/"
            path = exchange.path + (f"?{url.query}" if url.query else "")
            self._authenticate(request)
            up_reader, up_writer = await connect_checked(
                self.policy,
                Target(method, url.hostname, url.port or 80, path, header(request, b"host")),
                exchange,
                self.own,
            )
        except Refused as exc:
            exchange.status, exchange.rule, exchange.reason = exc.status, exc.rule, exc.reason
            self.policy.audit(exchange.record())
            raise
        exchange.decision = "allow"
        try:
            await self._relay(request, path, up_reader, up_writer, exchange)
        except (h11.RemoteProtocolError, ValueError) as exc:
            exchange.decision, exchange.rule, exchange.status = "deny", "malformed", 400
            exchange.reason = f"bad request: {exc}"
            raise
        finally:
            up_writer.close()
            self.policy.audit(exchange.record())
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def _relay(
        self,
        request: h11.Request,
        path: str,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        exchange: Exchange,
    ) -> None:
        upstream = h11.Connection(h11.CLIENT)
        headers = [(k, v) for k, v in request.headers if k not in HOP_BY_HOP]
        up_writer.write(
            upstream.send(
                h11.Request(
                    method=request.method,
                    target=path,
                    headers=[*headers, (b"connection", b"close")],
                )
            )
            or b""
        )
        while not isinstance(event := await next_event(self.conn, self.reader), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                exchange.bytes_out += len(event.data)
                up_writer.write(upstream.send(h11.Data(data=event.data)) or b"")
                await up_writer.drain()
        up_writer.write(upstream.send(h11.EndOfMessage()) or b"")
        await up_writer.drain()
        while True:
            event = await next_event(upstream, up_reader)
            if isinstance(event, h11.Response):
                exchange.status = event.status_code
                kept = [(k, v) for k, v in event.headers if k not in HOP_BY_HOP]
                self.writer.write(
                    self.conn.send(
                        h11.Response(
                            status_code=event.status_code, headers=kept, reason=event.reason
                        )
                    )
                    or b""
                )
            elif isinstance(event, h11.Data):
                exchange.bytes_in += len(event.data)
                self.writer.write(self.conn.send(h11.Data(data=event.data)) or b"")
                await self.writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                self.writer.write(self.conn.send(h11.EndOfMessage()) or b"")
                await self.writer.drain()
                return

    async def connect(self, request: h11.Request, authority: str) -> None:
        exchange = Exchange("CONNECT")
        try:
            self._authenticate(request)
            granted = self.policy.granted_tunnel(authority)
            if granted is not None:
                exchange.host, exchange.port = granted
                exchange.rule, exchange.reason = "granted-secret", "address of a granted secret"
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*granted), 10)
            else:
                host, _, port = authority.rpartition(":")
                if not port.isdigit():
                    raise Refused(400, "malformed", "CONNECT needs host:port")
                exchange.port = int(port)
                up_reader, up_writer = await connect_checked(
                    self.policy,
                    Target("CONNECT", host, int(port), None, header(request, b"host")),
                    exchange,
                    self.own,
                )
        except (TimeoutError, OSError) as exc:
            failure = Refused(502, "upstream", str(exc) or exc.__class__.__name__)
            exchange.status, exchange.rule, exchange.reason = 502, failure.rule, failure.reason
            self.policy.audit(exchange.record())
            raise failure from None
        except Refused as exc:
            exchange.status, exchange.rule, exchange.reason = exc.status, exc.rule, exc.reason
            self.policy.audit(exchange.record())
            raise
        exchange.decision, exchange.status = "allow", 200
        self.writer.write(self.conn.send(h11.Response(status_code=200, headers=[])) or b"")
        leftover, _ = self.conn.trailing_data
        if leftover:
            up_writer.write(leftover)
            exchange.bytes_out += len(leftover)
        try:
            sent, received = await asyncio.gather(
                pipe(self.reader, up_writer), pipe(up_reader, self.writer)
            )
            exchange.bytes_out += sent
            exchange.bytes_in += received
        finally:
            self.policy.audit(exchange.record())


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Copy one direction of a tunnel until either side closes; the bytes copied."""
    total = 0
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            total += len(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return total
