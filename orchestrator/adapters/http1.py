"""A small HTTP/1.1 client for the JSON calls on every task's path (Docker and Vault).

Each task makes about ten calls to the Docker engine and Vault. Through requests (under
docker-py and hvac) one such call costs the worker about a millisecond of CPU, most of it
requests preparing, merging and wrapping. This client keeps connections alive over a unix
socket or TCP (with TLS when given a context), writes the request in one send, and reads the
answer whole; h11 frames both directions (lengths, chunks, keep-alive, protocol switches).
Answers are capped at `max_body` bytes. `upgrade` hands over a connection the server
switched to a raw stream (the engine's attach). `Session` follows redirects, as requests
would for hvac (a Vault standby answers 307 with the active node's address).

Errors are OSError: a connection that could not be made raises what connect() raised
(ConnectionRefusedError, FileNotFoundError: nothing was sent), anything later raises
ProtocolError or the socket's own error.
"""

from __future__ import annotations

import contextlib
import io
import json
import select
import socket
import ssl
import threading
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import h11

MAX_IDLE = 16
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 << 20
MAX_REDIRECTS = 5
RECV_BYTES = 65536
_DEFAULT: Any = object()


class ProtocolError(OSError):
    """The server's answer was not HTTP/1.1 as expected, or the connection broke mid-answer."""


def never_sent(exc: BaseException) -> bool:
    """Whether a transport error happened while connecting (the request never left, so
    sending it again is safe)."""
    seen: list[object] = [exc]
    while seen:
        item = seen.pop()
        if isinstance(item, (FileNotFoundError, ConnectionRefusedError)):
            return True
        if isinstance(item, BaseException):
            seen.extend(item.args)
            if item.__cause__ is not None:
                seen.append(item.__cause__)
    return False


class Headers(dict[str, str]):
    """Header names are case-insensitive: stored lower-case, looked up in any case."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


class Response:
    """One complete answer. Named like requests' response where hvac reads it."""

    __slots__ = ("content", "headers", "reason", "status_code", "url")

    def __init__(self, status: int, reason: str, headers: Headers, content: bytes, url: str):
        self.status_code = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self.url = url

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Unanswered(Exception):
    """The peer closed the connection before a byte of the answer came back."""


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)

    def closed_by_peer(self) -> bool:
        """An idle connection with something to read has been closed (or spoiled) by the server."""
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def next_event(self, method: str, path: str) -> Any:
        """The next h11 event of the answer, reading from the socket as needed."""
        answered = self.h11.their_state is not h11.SEND_RESPONSE
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(f"{method} {path}: {exc}") from None
            if event is not h11.NEED_DATA:
                return event
            data = self.sock.recv(RECV_BYTES)
            if not data and not answered:
                raise _Unanswered
            answered = True
            self.h11.receive_data(data)

    def close(self) -> None:
        self.sock.close()


class _StreamIO(io.RawIOBase):
    """The raw stream after a protocol switch: what h11 had already read past the answer's
    head, then the socket. After a 200 that streams, the bytes of its body instead."""

    def __init__(self, conn: _Connection, prefix: bytes, framed: bool) -> None:
        self._conn, self._pending, self._framed = conn, prefix, framed

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            self._pending = self._more()
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _more(self) -> bytes:
        if not self._framed:
            return self._conn.sock.recv(RECV_BYTES)
        event = self._conn.next_event("stream", "")
        return bytes(event.data) if isinstance(event, h11.Data) else b""


class Stream:
    """A connection given over to a raw stream: read from `reader` (what the server sent
    after its answer's head included), then close."""

    def __init__(self, conn: _Connection, prefix: bytes = b"", framed: bool = False) -> None:
        self._conn = conn
        self.reader = io.BufferedReader(_StreamIO(conn, prefix, framed), RECV_BYTES)

    def close(self) -> None:
        try:
            self._conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked on it
        except OSError:
            pass
        self._conn.close()


class Client:
    """Keep-alive connections to one server; safe to share between threads."""

    def __init__(
        self,
        url: str,
        timeout: float | None = 60.0,
        tls: ssl.SSLContext | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        """`url`: unix:///path/to.sock, http+unix://<quoted path>, tcp://host:port,
        http://host[:port] or https://host[:port] (https needs `tls`, or makes a default one).
        An answer longer than `max_body` bytes is a ProtocolError.

        Raises ValueError for any other scheme.
        """
        self.max_body = max_body
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        parts = urlsplit(url)
        self.url = url
        self.timeout = timeout
        self._unix: str | None = None
        self._tls: ssl.SSLContext | None = None
        if parts.scheme in ("unix", "http+unix"):
            self._unix = unquote(parts.netloc) if parts.netloc else parts.path
            self._address: tuple[str, int] = ("localhost", 80)
            self._host = "localhost"
        elif parts.scheme in ("http", "tcp", "https"):
            secure = parts.scheme == "https"
            port = parts.port or (443 if secure else 80)
            self._address = (parts.hostname or "localhost", port)
            self._host = parts.netloc.rpartition("@")[2]
            if secure:
                self._tls = tls or ssl.create_default_context()
        else:
            raise ValueError(f"unsupported address {url!r}")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = _DEFAULT,
    ) -> Response:
        """Send one request (`body` as JSON, if given) and read its whole answer.

        A kept-alive connection the server closed while idle is replaced, and the request
        sent again once, only when not a byte of the answer had come back.
        """
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        fields = [("Host", self._host), *(headers or {}).items()]
        if body is not None:
            fields.append(("Content-Type", "application/json"))
        if body is not None or method in ("POST", "PUT"):
            fields.append(("Content-Length", str(len(payload))))
        request = h11.Request(method=method, target=path, headers=fields)
        wait = self.timeout if timeout is _DEFAULT else timeout
        conn, reused = self._take()
        try:
            try:
                response = self._exchange(conn, request, payload, wait)
            except _Unanswered:
                if not reused:
                    raise ProtocolError(
                        f"{method} {path}: the server closed the connection unanswered"
                    ) from None
                conn.close()  # closed while idle: once more, on a new connection
                conn = self._connect()
                response = self._exchange(conn, request, payload, wait)
        except _Unanswered:
            conn.close()
            raise ProtocolError(
                f"{method} {path}: the server closed the connection unanswered"
            ) from None
        except BaseException:
            conn.close()
            raise
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._give_back(conn)
        else:
            conn.close()
        return response

    def _exchange(
        self, conn: _Connection, request: h11.Request, payload: bytes, wait: float | None
    ) -> Response:
        """Send the request and read its answer; _Unanswered if the peer hung up first."""
        message = conn.h11.send(request) or b""
        if payload:
            message += conn.h11.send(h11.Data(data=payload)) or b""
        message += conn.h11.send(h11.EndOfMessage()) or b""
        conn.sock.settimeout(wait)
        try:
            conn.sock.sendall(message)
        except (ConnectionResetError, BrokenPipeError):
            raise _Unanswered from None
        method, path = request.method.decode(), request.target.decode()
        try:
            return self._read(conn, method, path)
        except ConnectionResetError:
            if conn.h11.their_state is h11.SEND_RESPONSE:
                raise _Unanswered from None
            raise

    def _read(self, conn: _Connection, method: str, path: str) -> Response:
        head = conn.next_event(method, path)
        while isinstance(head, h11.InformationalResponse):  # 100 Continue and the like
            head = conn.next_event(method, path)
        if not isinstance(head, h11.Response):
            raise ProtocolError(f"{method} {path}: the connection closed before the answer")
        return Response(
            head.status_code,
            head.reason.decode("latin-1"),
            _headers(head.headers),
            self._body(conn, method, path),
            path,
        )

    def _body(self, conn: _Connection, method: str, path: str) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event(method, path)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    raise ProtocolError(f"{method} {path}: answer over {self.max_body} bytes")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise ProtocolError(f"{method} {path}: answer cut short")

    def upgrade(self, method: str, path: str) -> tuple[Response, Stream | None]:
        """Ask for the connection to become a raw stream (Upgrade: tcp). On 101 (or a 200
        that streams), the stream, on a connection of its own with no timeout; otherwise the
        answer and None."""
        request = h11.Request(
            method=method,
            target=path,
            headers=[
                ("Host", self._host),
                ("Content-Length", "0"),
                ("Connection", "Upgrade"),
                ("Upgrade", "tcp"),
            ],
        )
        conn = self._connect()
        try:
            conn.sock.sendall(conn.h11.send(request) + conn.h11.send(h11.EndOfMessage()))
            head = conn.next_event(method, path)
            if isinstance(head, h11.InformationalResponse) and head.status_code == 101:
                prefix, _ = conn.h11.trailing_data
                stream = Stream(conn, bytes(prefix))
            elif isinstance(head, h11.Response) and head.status_code == 200:
                stream = Stream(conn, framed=True)
            else:
                if not isinstance(head, h11.Response):
                    raise ProtocolError(f"{method} {path}: unexpected {head!r}")
                body = self._body(conn, method, path)
                conn.close()
                reason = head.reason.decode("latin-1")
                return Response(head.status_code, reason, _headers(head.headers), body, path), None
        except _Unanswered:
            conn.close()
            raise ProtocolError(f"{method} {path}: the server closed the connection") from None
        except BaseException:
            conn.close()
            raise
        conn.sock.settimeout(None)  # a quiet task must not time its output out
        reason = head.reason.decode("latin-1")
        return Response(head.status_code, reason, _headers(head.headers), b"", path), stream

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __del__(self) -> None:
        # A client dropped without close() takes its idle connections along.
        with contextlib.suppress(Exception):  # at interpreter exit, half the world is gone
            self.close()

    # -- connections -------------------------------------------------------------------------
    def _take(self) -> tuple[_Connection, bool]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if not conn.closed_by_peer():
                return conn, True
            conn.close()

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self) -> _Connection:
        if self._unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self._unix)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(self._address, timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=self._address[0])
                except BaseException:
                    sock.close()
                    raise
        return _Connection(sock)


def _headers(fields: Any) -> Headers:
    """h11's header list (names lower-cased) as our case-insensitive mapping."""
    headers = Headers()
    for name, value in fields:
        dict.__setitem__(headers, name.decode("latin-1"), value.decode("latin-1"))
    return headers


class Session:
    """What hvac needs of a requests.Session, served by one Client per server address.

    hvac passes requests' keyword arguments (allow_redirects, verify, cert, proxies,
    timeout); a session is built for one server and its TLS settings, so those are fixed
    and the attributes hvac reads from a session it is given stay empty. Redirects are
    followed as requests follows them (307 and 308 keep the method and body), to at most
    MAX_REDIRECTS other addresses.
    """

    verify = cert = proxies = None

    def __init__(self, url: str, timeout: float | None = 30.0, tls: ssl.SSLContext | None = None):
        self._timeout, self._tls = timeout, tls
        self._prefix = _origin(url)
        self.client = Client(url, timeout=timeout, tls=tls)
        self._clients = {self._prefix: self.client}

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        json: Any = None,
        timeout: float | None = _DEFAULT,
        **requests_options: Any,
    ) -> Response:
        if requests_options.get("params") or requests_options.get("data"):
            raise ValueError("query parameters and form data are not supported")
        if not url.startswith(self._prefix):
            raise ValueError(f"{url} is not on {self._prefix}")
        method = method.upper()
        follow = requests_options.get("allow_redirects", True)
        for _ in range(MAX_REDIRECTS + 1):
            origin = _origin(url)
            path = url[len(origin) :] or "/"
            response = self._client(origin).request(method, path, json, headers, timeout)
            location = response.headers.get("location")
            if not follow or response.status_code not in REDIRECTS or not location:
                response.url = url
                return response
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise ProtocolError(f"{method} {path}: redirected to {url}")
            if response.status_code in (301, 302, 303) and method not in ("GET", "HEAD"):
                method, json = "GET", None  # as requests (and browsers) do
        raise ProtocolError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")

    def _client(self, origin: str) -> Client:
        client = self._clients.get(origin)
        if client is None:
            client = self._clients[origin] = Client(origin, self._timeout, self._tls)
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
