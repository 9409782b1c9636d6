"""A small HTTP/1.1 client for the JSON calls on every task's path (Docker and Vault).

Each task makes about ten calls to the Docker engine and Vault. Through requests (under
docker-py and hvac) one such call costs the worker about 0.4 ms of CPU, six times what the
call itself needs: most of that is requests preparing, merging and wrapping, and http.client
parsing headers with the email package. This client keeps connections alive over a unix
socket or TCP (with TLS when given a context), writes the request in one send, and reads the
answer whole, by Content-Length or chunks. `upgrade` hands over a connection the server
switched to a raw stream (the engine's attach).

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
from typing import Any, cast
from urllib.parse import unquote, urlsplit

MAX_IDLE = 16
MAX_HEADER_LINES = 100
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


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = cast(io.BufferedReader, sock.makefile("rb", buffering=65536))

    def closed_by_peer(self) -> bool:
        """An idle connection with something to read has been closed (or spoiled) by the server."""
        try:
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Stream:
    """A connection given over to a raw stream: read from `reader` (what the server sent
    after its answer's head included), then close."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.reader = conn.reader

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
    ) -> None:
        """`url`: unix:///path/to.sock, http+unix://<quoted path>, tcp://host:port,
        http://host[:port] or https://host[:port] (https needs `tls`, or makes a default one).

        Raises ValueError for any other scheme.
        """
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
        head = [f"{method} {path} HTTP/1.1", f"Host: {self._host}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        elif method in ("POST", "PUT"):
            head.append("Content-Length: 0")
        message = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
        wait = self.timeout if timeout is _DEFAULT else timeout
        conn, reused = self._take()
        try:
            status_line = self._send(conn, message, wait)
            if not status_line and reused:  # closed while idle: once more, on a new one
                conn.close()
                conn = self._connect()
                status_line = self._send(conn, message, wait)
            response, keep = self._read(conn, status_line, method, path)
        except BaseException:
            conn.close()
            raise
        if keep:
            self._give_back(conn)
        else:
            conn.close()
        return response

    @staticmethod
    def _send(conn: _Connection, message: bytes, wait: float | None) -> bytes:
        """Send the request; the answer's status line, or b"" if the peer hung up first."""
        conn.sock.settimeout(wait)
        try:
            conn.sock.sendall(message)
            return conn.reader.readline(65537)
        except (ConnectionResetError, BrokenPipeError):
            return b""

    def upgrade(self, method: str, path: str) -> tuple[Response, Stream | None]:
        """Ask for the connection to become a raw stream (Upgrade: tcp). On 101 (or a 200
        that streams), the stream, on a connection of its own with no timeout; otherwise the
        answer and None."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Length: 0\r\n"
        message = (head + "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n").encode("latin-1")
        conn = self._connect()
        try:
            conn.sock.sendall(message)
            status_line = conn.reader.readline(65537)
            version, _, rest = status_line.decode("latin-1").partition(" ")
            if version.startswith("HTTP/1.") and rest[:3] in ("101", "200"):
                headers = self._headers(conn, method, path)
                conn.sock.settimeout(None)  # a quiet task must not time its output out
                return Response(int(rest[:3]), rest[4:].strip(), headers, b"", path), Stream(conn)
            response, _ = self._read(conn, status_line, method, path)
        except BaseException:
            conn.close()
            raise
        conn.close()
        return response, None

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

    # -- answers -----------------------------------------------------------------------------
    def _read(
        self, conn: _Connection, status_line: bytes, method: str, path: str
    ) -> tuple[Response, bool]:
        if not status_line:
            raise ProtocolError(f"{method} {path}: the server closed the connection unanswered")
        version, _, rest = status_line.decode("latin-1").rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolError(f"{method} {path}: not an HTTP/1.1 answer: {status_line[:80]!r}")
        headers = self._headers(conn, method, path)
        status = int(code)
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            content = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            content = self._chunks(conn, method, path)
        elif "content-length" in headers:
            content = self._exactly(conn, int(headers["content-length"]), method, path)
        else:
            content, keep = conn.reader.read(), False  # the body runs to the end of the stream
        return Response(status, reason, headers, content, path), keep

    @staticmethod
    def _headers(conn: _Connection, method: str, path: str) -> Headers:
        headers = Headers()
        for _ in range(MAX_HEADER_LINES):
            line = conn.reader.readline(65537)
            if line in (b"\r\n", b"\n"):
                return headers
            if not line:
                raise ProtocolError(f"{method} {path}: connection closed in the headers")
            name, _, value = line.decode("latin-1").partition(":")
            dict.__setitem__(headers, name.strip().lower(), value.strip())
        raise ProtocolError(f"{method} {path}: too many header lines")

    @staticmethod
    def _exactly(conn: _Connection, size: int, method: str, path: str) -> bytes:
        data = conn.reader.read(size)
        if len(data) != size:
            raise ProtocolError(f"{method} {path}: answer cut short")
        return data

    def _chunks(self, conn: _Connection, method: str, path: str) -> bytes:
        parts = []
        while True:
            line = conn.reader.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"{method} {path}: bad chunk size {line[:40]!r}") from None
            if size == 0:
                break
            parts.append(self._exactly(conn, size, method, path))
            self._exactly(conn, 2, method, path)  # the chunk's CRLF
        while conn.reader.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)


class Session:
    """What hvac needs of a requests.Session, served by one Client per server address.

    hvac passes requests' keyword arguments (allow_redirects, verify, cert, proxies,
    timeout); a session is built for one server and its TLS settings, so those are fixed
    and the attributes hvac reads from a session it is given stay empty.
    """

    verify = cert = proxies = None

    def __init__(self, url: str, timeout: float | None = 30.0, tls: ssl.SSLContext | None = None):
        self.client = Client(url, timeout=timeout, tls=tls)
        parts = urlsplit(url)
        self._prefix = f"{parts.scheme}://{parts.netloc}"

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
        path = url[len(self._prefix) :] or "/"
        return self.client.request(method.upper(), path, json, headers, timeout)

    def close(self) -> None:
        self.client.close()
