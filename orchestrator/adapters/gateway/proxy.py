"""The gateway's thin asyncio shell: it moves bytes, and asks the pure core what is allowed.

One client connection carries a sequence of requests (keep-alive), read by llhttp
(task_http.py). Request heads are scanned for smuggling (Content-Length with
Transfer-Encoding, repeated Content-Length, line ends other than CRLF) before llhttp sees
them; pipelined requests are refused. Plain HTTP is
forwarded in origin form, with the path in its one normal form, to exactly the address that
was checked; CONNECT becomes a byte tunnel to it once the client's TLS ClientHello names
the CONNECT host (no domain fronting inside a granted tunnel). The upstream's answers are
read by llhttp (upstream_http.py); an upstream connection is kept for the task's next
request only when its last answer ended exactly where its framing said.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from orchestrator.adapters.gateway.addresses import IPAddress
from orchestrator.adapters.gateway.decide import Target, Verdict
from orchestrator.adapters.gateway.http import (
    HOP_BY_HOP,
    ControlHandler,
    Exchange,
    Idle,
    ProxyPolicy,
    Refused,
    read_chunk,
    refusal,
)
from orchestrator.adapters.gateway.interception import LeafCertificates, name_problem
from orchestrator.adapters.gateway.link import Link, open_link
from orchestrator.adapters.gateway.mcp import (
    MAX_MCP_BODY,
    EventStreamFilter,
    filter_json_body,
    inspect_request,
    refusal_body,
)
from orchestrator.adapters.gateway.task_http import Request, TaskConnection
from orchestrator.adapters.gateway.tls_hello import NotTls, hello_length, server_name
from orchestrator.adapters.gateway.upstream_http import (
    LAST_CHUNK,
    Answer,
    Head,
    Names,
    Upstream,
    chunk,
    connect_checked,
    field_value,
    request_head,
)

_SCHEMES = ("Bearer", "Basic")  # how a task may present its JWT to the gateway
MAX_CONTROL_BODY = 64 * 1024  # a control request's JSON
HANDSHAKE_S = 10.0  # how long an intercepted tunnel's client has for its TLS handshake


@dataclass(frozen=True)
class Inside:
    """An intercepted tunnel: where its CONNECT went, and the credentials it carried (each
    request inside is authenticated with them again, and decided on its own)."""

    host: str  # normalized
    port: int
    credentials: str | None


class Session:
    """One client connection on a task's socket."""

    def __init__(
        self,
        link: Link,
        control: ControlHandler,
        policy: ProxyPolicy,
        own: Callable[[], frozenset[IPAddress]],
        tls: ssl.SSLContext | None = None,
        certificates: LeafCertificates | None = None,
    ) -> None:
        self.link = link
        self.control, self.policy, self.own = control, policy, own
        self.idle = Idle()  # made on the loop, in the task that serves this connection
        self.task = TaskConnection(link, self.idle)
        # Upstream connections kept alive between this client's requests, by checked address.
        self.pool: dict[tuple[IPAddress, int, str], Upstream] = {}
        self.names: Names = {}  # its lookups, reused for a while (every address still checked)
        self.tls = tls
        self.certificates = certificates
        self.inside: Inside | None = None  # once the connection is an intercepted tunnel

    async def run(self) -> None:
        try:
            await self._requests()
        except Refused as exc:
            await self._refuse(exc)
        except ValueError as exc:  # Malformed outside a request's exchange (which audits its own)
            self.policy.audit(Exchange("?", rule="malformed", reason=str(exc), status=400).record())
            await self._refuse(Refused(400, "malformed", f"bad request: {exc}"))
        except (TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            if not self.idle.absorbed():
                raise
        finally:
            self.idle.stop()
            self.link.close()
            for upstream in self.pool.values():
                upstream.close()

    async def _requests(self) -> None:
        """Serve requests on the connection until it ends (or becomes a plain tunnel)."""
        while True:
            try:
                request = await self.task.next_request()
            except Refused as exc:
                if exc.rule == "smuggling":
                    self.policy.audit(Exchange("?", reason=exc.reason, rule="smuggling").record())
                raise
            if request is None or not await self.dispatch(request):
                return
            if not self.task.reusable():
                return

    async def _refuse(self, exc: Refused) -> None:
        if self.task.answering:
            return
        status, payload, headers = refusal(exc)
        try:
            await self.task.respond(status, payload, [*headers, ("connection", "close")])
        except ConnectionError:
            pass

    async def dispatch(self, request: Request) -> bool:
        """Serve one request; whether another may follow it on the connection."""
        target = request.target.decode("latin-1")
        if self.inside is not None:  # the task's own TLS, ended here: the upstream's paths
            if request.method == b"CONNECT" or not target.startswith("/"):
                raise Refused(400, "malformed", "inside a tunnel, requests name a /path only")
        elif request.method == b"CONNECT":
            await self.connect(request, target)
            return False
        elif target.startswith("/"):
            body = await self.task.read_body(MAX_CONTROL_BODY)
            self.idle.stop()  # the handler may wait on Vault; the answer ends the connection
            status, payload = await self.control(request.method.decode(), target, body)
            await self.task.respond(status, payload, [("connection", "close")])
            return False
        await self.forward(request, target)
        return True

    def _audit_refusal(self, exchange: Exchange, refused: Refused) -> None:
        exchange.status, exchange.rule, exchange.reason = (
            refused.status,
            refused.rule,
            refused.reason,
        )
        self.policy.audit(exchange.record())

    def _authenticate(self, credentials: str | None) -> None:
        over = self.policy.count_request()
        if over:
            raise Refused(429, "limits", over)
        why = self.policy.authenticate(credentials)
        if why:
            # Basic too (the JWT as its password): clients such as git offer credentials
            # only in a scheme the proxy names, and none of them knows Bearer.
            challenge = [("proxy-authenticate", f'{scheme} realm="airlock"') for scheme in _SCHEMES]
            raise Refused(407, "identity", why, challenge)

    async def forward(self, request: Request, target: str) -> None:
        method = request.method.decode()
        exchange = Exchange(method)
        try:
            if self.inside is not None:
                path, mark, query = target.partition("#")[0].partition("?")
                host, exchange.port, exchange.scheme = self.inside.host, self.inside.port, "https"
                credentials = self.inside.credentials
            else:
                url = urlsplit(target)
                if url.scheme != "http" or not url.hostname:
                    raise Refused(400, "scheme", "only absolute http:// URLs; use CONNECT for TLS")
                path, mark, query = url.path or "/", "?" if url.query else "", url.query
                host, exchange.port = url.hostname, url.port or 80
                credentials = request.header(b"proxy-authorization")
            exchange.path = path
            query = f"{mark}{query}"
            host_header = request.header(b"host")
            asked = Target(method, host, exchange.port, path + query, host_header, exchange.scheme)
            self._authenticate(credentials)
            upstream, verdict = await connect_checked(
                self.policy,
                asked,
                exchange,
                self.own,
                self.pool,
                self.tls,
                names=self.names,
            )
        except Refused as exc:
            self._audit_refusal(exchange, exc)
            raise
        exchange.decision = "allow"
        # What was decided is what goes upstream: the path in its normal form (decide.py).
        path = exchange.path + query
        server = verdict.rule[4:] if verdict.rule.startswith("mcp ") else None
        try:
            if server is None:
                inject = self._injection(verdict)
                if inject is not None and inject[1] is not None and verdict.inject is not None:
                    exchange.injected = verdict.inject.name  # named in the audit, never valued
                await self._relay(request, path, upstream, exchange, inject)
            else:
                await self._relay_mcp(request, path, upstream, exchange, server)
        except ValueError as exc:  # audited here, refused as such
            exchange.decision, exchange.rule, exchange.status = "deny", "malformed", 400
            exchange.reason = f"bad request: {exc}"
            raise Refused(400, "malformed", exchange.reason) from exc
        except Refused as exc:  # allowed, but what came back (or was to be added) would not do
            exchange.status, exchange.reason = exc.status, exc.reason
            raise
        finally:
            self.policy.relayed(exchange.bytes_in + exchange.bytes_out)
            self.policy.audit(exchange.record())
            if upstream.reusable() and len(self.pool) < 4:
                self.pool[upstream.key] = upstream
            else:
                upstream.close()

    def _send_request(
        self,
        upstream: Upstream,
        request: Request,
        path: str,
        body: bytes | None = None,
        inject: tuple[bytes, bytes | None] | None = None,
    ) -> Answer:
        """Start the request upstream: its head, and `body` whole when it was re-framed; the
        answer to read."""
        headers = [(k, v) for k, v in request.headers if k not in HOP_BY_HOP]
        if inject is not None:
            # A credentialed upstream: whatever the task sent in that header is dropped, and
            # the real credential added only when the gateway speaks TLS to the upstream.
            name, value = inject
            headers = [(k, v) for k, v in headers if k != name]
            if value is not None:
                headers.append((name, value))
        if body is not None:  # re-framed: the inspected body goes as one piece
            headers = [
                (k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")
            ]
            headers.append((b"content-length", b"%d" % len(body)))
        answer = upstream.next_answer(head_only=request.method == b"HEAD")
        upstream.link.write(request_head(request.method, path, headers) + (body or b""))
        return answer

    def _injection(self, verdict: Verdict) -> tuple[bytes, bytes | None] | None:
        if verdict.inject is None:
            return None
        value = self.policy.credential(verdict.inject.name) if verdict.tls else None
        rendered = verdict.inject.template.format(value=value).encode() if value else None
        if rendered is not None and not field_value(rendered):
            raise Refused(502, "inject", "the credential is not a valid header value")
        return verdict.inject.header.encode(), rendered

    async def _relay(
        self,
        request: Request,
        path: str,
        upstream: Upstream,
        exchange: Exchange,
        inject: tuple[bytes, bytes | None] | None = None,
    ) -> None:
        answer = self._send_request(upstream, request, path, inject=inject)
        # The body goes as the task framed it (llhttp has checked that framing).
        chunked = request.chunked
        while (piece := await self.task.body()) is not None:
            exchange.bytes_out += len(piece)
            upstream.link.write(chunk(piece) if chunked else piece)
            await upstream.link.drain()
        if chunked:
            upstream.link.write(LAST_CHUNK)
        await upstream.link.drain()
        await self._relay_response(answer, upstream.link, exchange)

    async def _relay_mcp(
        self, request: Request, path: str, upstream: Upstream, exchange: Exchange, server: str
    ) -> None:
        """An MCP request: every JSON-RPC message decided, tool lists filtered on the way back."""
        body = await self.task.read_body(MAX_MCP_BODY)
        exchange.bytes_out = len(body)
        schemas = self.policy.tool_schemas
        calls, batch = (
            inspect_request(self.policy.grant, server, body, schemas) if body else ([], False)
        )
        for call in calls:
            self.policy.audit(
                {
                    **exchange.record(),
                    "mcp_method": call.method,
                    "tool": call.tool,
                    "decision": "allow" if call.allowed else "deny",
                    "rule": call.rule,
                    "reason": call.reason,
                }
            )
        if not all(call.allowed for call in calls):
            exchange.decision, exchange.status = "deny", 403
            exchange.rule = next(c.rule for c in calls if not c.allowed)
            exchange.reason = "; ".join(c.reason for c in calls if not c.allowed)
            refused = refusal_body(calls, batch)
            head = self.task.start(
                403,
                [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(refused)),
                    (b"x-airlock-denied", exchange.rule.encode()),
                ],
            )
            self.link.write(head + refused + self.task.end())
            await self.link.drain()
            return
        answer = self._send_request(upstream, request, path, body)
        await upstream.link.drain()
        await self._relay_mcp_response(answer, upstream.link, exchange, server)

    async def _relay_response(
        self, answer: Answer, reader: Link, exchange: Exchange
    ) -> None:
        """Stream the upstream's answer back; what is already parsed goes out in one write."""
        out = b""
        while (event := await answer.next(reader, self.idle)) is not None:
            if isinstance(event, Head):
                out += self._start_response(event, exchange)
            else:
                exchange.bytes_in += len(event)
                out += self.task.piece(event)
            if not answer.buffered():
                self.link.write(out)
                out = b""
                await self.link.drain()
        self.link.write(out + self.task.end())
        await self.link.drain()

    async def _relay_mcp_response(
        self,
        answer: Answer,
        reader: Link,
        exchange: Exchange,
        server: str,
    ) -> None:
        """An MCP server's answer: event streams filtered as they flow, JSON as a whole,
        anything else dropped."""
        response = await answer.next(reader, self.idle)
        if not isinstance(response, Head):
            raise ConnectionResetError("the upstream closed before its answer")
        kind = dict(response.headers).get(b"content-type", b"").split(b";")[0].strip()
        stream = EventStreamFilter(self.policy.grant, server, self.policy.tool_schemas)
        if kind != b"application/json":
            self.link.write(self._start_response(response, exchange, reframe=True))
        body = b""
        while (event := await answer.next(reader, self.idle)) is not None:
            if not isinstance(event, bytes):
                continue
            exchange.bytes_in += len(event)
            if kind == b"application/json":
                body += event
                if len(body) > MAX_MCP_BODY:
                    raise Refused(502, "mcp-malformed", "MCP answer too large to inspect")
            # An MCP answer is JSON or an event stream; any other body is not passed on.
            elif kind == b"text/event-stream" and (data := stream.feed(event)):
                self.link.write(self.task.piece(data))
                await self.link.drain()
        if kind == b"application/json":
            filtered = filter_json_body(self.policy.grant, server, body, self.policy.tool_schemas)
            self.link.write(
                self._start_response(response, exchange, reframe=True, length=len(filtered))
            )
            self.link.write(self.task.piece(filtered))
        elif rest := stream.finish():
            self.link.write(self.task.piece(rest))
        self.link.write(self.task.end())
        await self.link.drain()

    def _start_response(
        self,
        response: Head,
        exchange: Exchange,
        reframe: bool = False,
        length: int | None = None,
    ) -> bytes:
        """The upstream's status and headers, as sent on; `reframe` when the body will change."""
        exchange.status = response.status
        kept = response.headers
        if reframe or any(k in HOP_BY_HOP for k, _ in response.headers):
            kept = [(k, v) for k, v in response.headers if k not in HOP_BY_HOP]
        if reframe:
            kept = [(k, v) for k, v in kept if k not in (b"content-length", b"transfer-encoding")]
            if length is not None:
                kept.append((b"content-length", b"%d" % length))
        return self.task.start(response.status, kept, response.reason)

    async def _client_hello(self, first: bytes, host: str) -> tuple[bytes, str | None]:
        """The tunnel's first bytes (its whole ClientHello), and why it must be cut, if so."""
        try:
            hello = await _read_hello(self.link, first, self.idle)
        except NotTls as exc:
            return b"", str(exc)
        except ConnectionError as exc:
            return b"", f"no ClientHello: {exc or exc.__class__.__name__}"
        except asyncio.CancelledError:
            if not self.idle.absorbed():
                raise
            return b"", "no ClientHello within the idle timeout"
        return hello, sni_problem(hello, host)

    async def connect(self, request: Request, authority: str) -> None:
        exchange = Exchange("CONNECT", scheme="https")
        # Named in the audit even when the tunnel is refused before anything is decided (a
        # client's first CONNECT, without credentials, is answered 407).
        asked_host, _, asked_port = authority.rpartition(":")
        exchange.host = asked_host[:255]
        exchange.port = int(asked_port) if asked_port.isdigit() and len(asked_port) <= 5 else 0
        credentials = request.header(b"proxy-authorization")
        try:
            self._authenticate(credentials)
            granted = self.policy.granted_tunnel(authority)
            if granted is not None:
                exchange.host, exchange.port = granted
                exchange.rule, exchange.reason = "granted-secret", "address of a granted secret"
                exchange.scheme = "tcp"
                up = await asyncio.wait_for(open_link(*granted), 10)
            else:
                host, _, port = authority.rpartition(":")
                if not port.isdigit():
                    raise Refused(400, "malformed", "CONNECT needs host:port")
                exchange.port = int(port)
                asked = Target("CONNECT", host, int(port), None, request.header(b"host"))
                verdict = self.policy.decide(asked)
                if not verdict.allowed or verdict.passthrough:
                    tunnel, _ = await connect_checked(
                        self.policy, asked, exchange, self.own, decided=verdict
                    )
                    up = tunnel.link
        except (TimeoutError, OSError) as exc:
            failure = Refused(502, "upstream", str(exc) or exc.__class__.__name__)
            self._audit_refusal(exchange, failure)
            raise failure from None
        except Refused as exc:
            self._audit_refusal(exchange, exc)
            raise
        if granted is None and not verdict.passthrough:
            await self._intercept(verdict, exchange, credentials)
        else:
            await self._tunnel(exchange, up, tls=granted is None)

    async def _tunnel(
        self,
        exchange: Exchange,
        up: Link,
        tls: bool,
    ) -> None:
        """An opaque tunnel: a passthrough rule's (TLS, its server name checked first) or a
        granted secret's (a database's own protocol)."""
        over = self.policy.tunnel(+1)
        if over is not None:
            up.close()
            refused = Refused(429, "limits", over)
            self._audit_refusal(exchange, refused)
            raise refused
        exchange.decision, exchange.status = "allow", 200
        self.link.write(self.task.start(200, []))
        leftover = self.task.leftover
        try:
            if tls:  # its ClientHello must name the CONNECT host
                leftover, problem = await self._client_hello(leftover, exchange.host)
                if problem is not None:
                    exchange.decision, exchange.status = "deny", 403
                    exchange.rule, exchange.reason = "sni", problem
                    return
            if leftover:
                up.write(leftover)
                exchange.bytes_out += len(leftover)
            self.idle.stop()  # a tunnel may stay silent as long as its peers like
            sent, received = await asyncio.gather(
                pipe(self.link, up, self.policy.relayed),
                pipe(up, self.link, self.policy.relayed),
            )
            exchange.bytes_out += sent
            exchange.bytes_in += received
        finally:
            up.close()  # already, unless cut or cancelled before the relay began
            self.policy.tunnel(-1)
            self.policy.audit(exchange.record())

    async def _intercept(
        self, verdict: Verdict, exchange: Exchange, credentials: str | None
    ) -> None:
        """End the task's TLS here with a leaf for the CONNECT host, then serve the requests
        inside one by one, each decided as if it were plain HTTP (every rule holds)."""
        exchange.host, exchange.rule = verdict.host, verdict.rule
        try:
            context = await self._leaf(verdict.host)
            over = self.policy.tunnel(+1)
            if over is not None:
                raise Refused(429, "limits", over)
        except Refused as exc:
            self._audit_refusal(exchange, exc)
            raise
        exchange.decision, exchange.status = "allow", 200
        exchange.reason = "intercepted: each request inside is decided"
        try:
            self.link.write(self.task.start(200, []))
            try:
                # No loop turn between the answer and start_tls (wait_for would add one, in
                # a task of its own): the ClientHello must reach TLS, not this stream's buffer.
                async with asyncio.timeout(HANDSHAKE_S):
                    await self.link.start_tls(context)
            except (ssl.SSLError, TimeoutError, ConnectionError, OSError) as exc:
                exchange.decision, exchange.rule = "deny", "interception"
                exchange.reason = f"no TLS handshake with the task: {exc or exc.__class__.__name__}"
                return
            sslobj = self.link.get_extra_info("ssl_object")
            problem = name_problem(getattr(sslobj, "airlock_sni", None), verdict.host)
            if problem is not None:
                exchange.decision, exchange.status = "deny", 403
                exchange.rule, exchange.reason = "sni", problem
                return
            self.inside = Inside(verdict.host, exchange.port, credentials)
            self.task = TaskConnection(self.link, self.idle)
            await self._requests()
        finally:
            self.policy.tunnel(-1)
            self.policy.audit(exchange.record())

    async def _leaf(self, host: str) -> ssl.SSLContext:
        """The TLS server context to meet the task with, for `host`; Refused if none."""
        if self.certificates is None:
            raise Refused(503, "interception", "this gateway has no CA to intercept TLS with")
        if self.task.leftover:
            raise Refused(400, "malformed", "TLS bytes sent before the CONNECT was answered")
        try:
            return await self.certificates.context(host)
        except Exception as exc:  # Vault's answer, whatever it is: the tunnel is refused
            raise Refused(503, "interception", f"no certificate for {host}: {exc}") from None


async def _read_hello(reader: Link, first: bytes, idle: Idle) -> bytes:
    """The client's first bytes in a tunnel, up to the end of its ClientHello. Raises NotTls,
    or ConnectionError (closed before the hello ended)."""
    data = first
    while hello_length(data) is None:
        chunk = await read_chunk(reader, idle)
        if not chunk:
            raise ConnectionError("the client closed the tunnel before its ClientHello")
        data += chunk
    return data


def sni_problem(hello: bytes, host: str) -> str | None:
    """Why a tunnel whose ClientHello is `hello` does not go to `host` (the CONNECT host,
    normalized), or None when it does: the SNI must be that host, or absent for an
    address (clients send no SNI for an IP literal)."""
    try:
        return name_problem(server_name(hello), host)
    except NotTls as exc:
        return str(exc)


async def pipe(
    reader: Link,
    writer: Link,
    relayed: Callable[[int], str | None] = lambda n: None,
) -> int:
    """Copy one direction of a tunnel until either side closes, or the task's byte budget
    is spent (`relayed` says why); the bytes copied."""
    total = 0
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            total += len(chunk)
            await writer.drain()
            if relayed(len(chunk)) is not None:
                break
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return total
