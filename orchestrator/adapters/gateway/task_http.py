"""The gateway's side of a task's HTTP/1.1 connection: requests parsed by llhttp (httptools),
strictly, and answers written as bytes.

One request at a time: a request's head is read whole and checked for framing two parsers
could read differently (smuggling_problem) before llhttp sees it; bytes of a next request
that arrive before the answer to this one (pipelining) end the connection once this one is
answered. The connection carries another request only when both the request and its
answer ended by their framing and neither side asked to close.
"""

from __future__ import annotations

import json
from collections import deque
from http import HTTPStatus
from typing import Any, NamedTuple

import httptools

from orchestrator.adapters.gateway.http import (
    Idle,
    Refused,
    read_chunk,
    read_head,
    smuggling_problem,
)
from orchestrator.adapters.gateway.link import Link
from orchestrator.adapters.gateway.upstream_http import LAST_CHUNK, chunk

_NO_BODY = (204, 304)


class Malformed(ValueError):
    """A request llhttp (or HTTP/1.1's rules on top of it) will not read."""


class Request(NamedTuple):
    """A request's line and headers (names lowercased, in order)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    http10: bool
    chunked: bool  # its body comes in chunks (else: Content-Length, or none)

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


class _Pipelined(Exception):
    """A next request's bytes behind a whole one (raised from llhttp's callback)."""


class TaskConnection:
    """The task's HTTP/1.1 connection: `await next_request()`, then `await body()` piece by
    piece until None, then the answer (`start`, `piece`, `end` give its bytes; `respond`
    writes a whole JSON one)."""

    def __init__(self, link: Link, idle: Idle | None = None) -> None:
        self.link, self.idle = link, idle
        self.request: Request | None = None
        self.leftover = b""  # bytes after a CONNECT's head: the tunnel's first
        self.answering = False  # an answer has begun and not ended: no other can be sent
        self._answered = False
        self._keep = False  # whether the connection may carry another request
        self._chunked_out = False
        self._pieces: deque[bytes] = deque()
        self._complete = False
        self._pipelined = False
        self._parser: httptools.HttpRequestParser | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []

    # -- llhttp's callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:
            raise _Pipelined

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        # Only now: once the message is over, llhttp forgets what its headers said.
        assert self._parser is not None
        self._keep = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    # -- requests -------------------------------------------------------------------------
    async def next_request(self) -> Request | None:
        """The next request's head; None when the task closed between requests. Raises
        Refused (smuggling, a head too large) or Malformed."""
        self.request = None
        buffer = bytearray()
        if not await read_head(self.link, buffer, self.idle):
            return None
        end = buffer.find(b"\r\n\r\n")
        problem = smuggling_problem(bytes(buffer[:end] if end >= 0 else buffer))
        if problem:
            raise Refused(400, "smuggling", problem)
        # One parser for the connection's requests, one after another (a fresh one after
        # an upgrade, whose end llhttp leaves paused).
        parser = self._parser
        if parser is None:
            self._parser = parser = httptools.HttpRequestParser(self)
        self._url, self._headers, self._pieces = b"", [], deque()
        self._complete = self._pipelined = self.answering = self._answered = self._keep = False
        self.leftover = b""
        self._feed_head(parser, buffer)
        headers = self._headers
        host, coding = False, []
        for name, value in headers:
            if name == b"host":
                host = True
            elif name == b"transfer-encoding":
                coding.append(value.strip().lower())
        if coding and coding != [b"chunked"]:
            raise Malformed("a transfer coding other than chunked")
        http10 = parser.get_http_version() == "1.0"
        if not host and not http10:
            raise Malformed("no Host header")
        self.request = Request(parser.get_method(), self._url, headers, http10, bool(coding))
        return self.request

    def _feed_head(self, parser: httptools.HttpRequestParser, buffer: bytearray) -> None:
        """Parse a request head (and what follows it)."""
        try:
            parser.feed_data(buffer)
        except httptools.HttpParserUpgrade as exc:
            # CONNECT (the rest is the tunnel's) or an Upgrade (the rest is not read).
            self._parser = None
            rest = bytes(buffer[exc.args[0] :])
            self._complete = True
            if parser.get_method() == b"CONNECT":
                self.leftover = rest
            else:
                self._pipelined = bool(rest)
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__ or exc.__cause__
        if isinstance(cause, _Pipelined):
            self._pipelined = True
            return
        if isinstance(exc, httptools.HttpParserCallbackError) and cause is not None:
            raise cause
        raise Malformed(str(exc) or exc.__class__.__name__) from None

    async def body(self) -> bytes | None:
        """The request body's next piece; None at its end."""
        while not self._pieces:
            if self._complete:
                return None
            data = await read_chunk(self.link, self.idle)
            if not data:
                raise ConnectionResetError("the task closed inside its request")
            assert self._parser is not None
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
        return self._pieces.popleft()

    async def read_body(self, limit: int) -> bytes:
        body = b""
        while (piece := await self.body()) is not None:
            body += piece
            if len(body) > limit:
                raise Refused(413, "limits", "request body too large")
        return body

    def reusable(self) -> bool:
        """Whether the connection carries another request: this one and its answer ended by
        their framing, neither side asked to close. Raises Refused when the task sent its
        next request before this one was answered."""
        if self._pipelined:
            raise Refused(400, "pipelining", "pipelined requests are not supported")
        return self._keep and self._complete and self._answered

    # -- answers --------------------------------------------------------------------------
    def start(self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b"") -> bytes:
        """The answer's head. Its framing is the headers' own: Content-Length, chunked (the
        pieces are chunked here), or neither: chunked to an HTTP/1.1 task, the connection's
        end to an HTTP/1.0 one."""
        request = self.request
        self.answering = True
        if request is not None and request.method == b"CONNECT" and 200 <= status < 300:
            return b"HTTP/1.1 %d Connection established\r\n\r\n" % status  # the tunnel's
        headers = self._framed(request, status, headers)
        if not reason:
            try:
                reason = HTTPStatus(status).phrase.encode()
            except ValueError:
                reason = b""
        lines = [b"HTTP/1.1 %d %s" % (status, reason)]
        lines.extend(name + b": " + value for name, value in headers)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _framed(
        self, request: Request | None, status: int, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """`headers`, with what frames the body and says whether the connection goes on."""
        names = {name for name, _ in headers}
        self._chunked_out = False
        if request is None:  # refused before a request could be read: the end
            self._keep = False
        elif request.method == b"HEAD" or status in _NO_BODY or status < 200:
            pass
        elif b"transfer-encoding" in names:
            self._chunked_out = True
        elif b"content-length" not in names:
            if request.http10:
                self._keep = False
            else:
                headers = [*headers, (b"transfer-encoding", b"chunked")]
                self._chunked_out = True
        if b"connection" in names:  # only the gateway's own answers name it: they close
            self._keep = False
        elif not self._keep or not self._complete:
            self._keep = False
            headers = [*headers, (b"connection", b"close")]
        return headers

    def piece(self, data: bytes) -> bytes:
        """A piece of the answer's body, framed."""
        return chunk(data) if self._chunked_out and data else data

    def end(self) -> bytes:
        """The end of the answer's body, framed."""
        self._answered, self.answering = True, False
        return LAST_CHUNK if self._chunked_out else b""

    async def respond(
        self, status: int, payload: dict[str, Any], headers: list[tuple[str, str]] | None = None
    ) -> None:
        """A whole JSON answer."""
        data = json.dumps(payload).encode()
        all_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(data)),
            *((k.encode(), v.encode()) for k, v in headers or []),
        ]
        self.link.write(self.start(status, all_headers) + data + self.end())
        await self.link.drain()
