"""The gateway's side of an upstream HTTP/1.1 connection: requests written as bytes, answers
parsed by llhttp (httptools), strictly (CRLF line ends only, one body framing).

This side only carries a request the task's side (task_http.py) has already parsed and
checked, and hands back the answer as events for the task's side to send on.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import httptools

from orchestrator.adapters.gateway.addresses import IPAddress
from orchestrator.adapters.gateway.decide import Target, Verdict, decide_addresses
from orchestrator.adapters.gateway.http import (
    Exchange,
    Idle,
    ProxyPolicy,
    Refused,
    read_chunk,
    resolve,
)
from orchestrator.adapters.gateway.link import Link, open_link

MAX_ANSWER_HEAD = 16 * 1024
RESOLVED_FOR_S = 30.0  # how long a connection reuses its own lookup of a name
Names = dict[tuple[str, int], tuple[float, list[IPAddress]]]  # (host, port): (until, addresses)
# A header value as RFC 9110 allows it: visible characters, spaces and tabs inside.
_FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)


def request_head(method: bytes, target: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 request head. Names and values come from a request llhttp has parsed, or
    from the gateway (checked by `field_value`); the target is the decided path."""
    lines = [b"%s %s HTTP/1.1" % (method, target.encode("latin-1"))]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def field_value(value: bytes) -> bool:
    """Whether `value` may be sent as a header value (no CR, LF, NUL or other controls)."""
    return _FIELD_VALUE.fullmatch(value) is not None


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class Head(NamedTuple):
    """The status line and headers of an answer (names lowercased)."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]


class Answer:
    """The upstream's answer to one request: `await next(reader)` gives a Head, then the
    body's bytes piece by piece, then None. Informational (1xx) answers are passed over.

    An answer without a length (neither Content-Length nor chunked) ends when the upstream
    closes; the connection is kept for another request only when the answer ended by its
    framing and the upstream did not ask to close."""

    def __init__(self, head_only: bool = False) -> None:
        self.head_only = head_only  # the answer to HEAD: its head is all of it
        self._parser = httptools.HttpResponseParser(self)
        self._events: deque[Head | bytes] = deque()
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._size = 0
        self._head: Head | None = None
        self.done = False
        self.keep_alive = False

    def restart(self, head_only: bool) -> None:
        """Read the next answer on the same connection, with the same parser."""
        self.head_only, self._head, self.done, self.keep_alive = head_only, None, False, False
        self._events.clear()

    # -- llhttp's callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:  # bytes past the end of the answer: the connection is not kept
            raise _PastTheEnd

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._grow(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value))
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers, reason = self._headers, self._reason
        self._headers, self._reason, self._size = [], b"", 0
        if status < 200:  # 100 Continue, 103 Early Hints: not sent on
            return
        coding = [v.strip().lower() for k, v in headers if k == b"transfer-encoding"]
        if coding and coding != [b"chunked"]:
            raise Refused(
                502, "upstream", "the upstream's answer has a transfer coding other than chunked"
            )
        self._head = Head(status, reason, headers)
        self._events.append(self._head)
        if self.head_only:  # ends here, and its connection is not kept (keep_alive stays off)
            self.done = True

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self._events.append(body)

    def on_message_complete(self) -> None:
        if self._head is not None and not self.done:
            self.done = True
            self.keep_alive = self._parser.should_keep_alive()

    # -- reading ------------------------------------------------------------------------------
    def _grow(self, size: int) -> None:
        self._size += size
        if self._size > MAX_ANSWER_HEAD:
            raise Refused(502, "upstream", "the upstream's answer head is too large")

    def _until_close(self) -> bool:
        """Whether the answer's body is delimited by the upstream closing (no length)."""
        if self._head is None or self._head.status in (204, 304):
            return False
        names = {name for name, _ in self._head.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def buffered(self) -> bool:
        """Whether the next event is at hand, without reading from the upstream."""
        return bool(self._events) or self.done

    async def next(
        self, reader: Link, idle: Idle | None = None
    ) -> Head | bytes | None:
        while not self._events:
            if self.done:
                return None
            data = await read_chunk(reader, idle)
            if not data:
                if self._until_close():
                    self.done = True
                    continue
                raise ConnectionResetError("the upstream closed inside its answer")
            self._feed(data)
        return self._events.popleft()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, Refused):
                raise cause from None
            if not isinstance(cause, _PastTheEnd):
                raise
            self.keep_alive = False
        except httptools.HttpParserUpgrade:
            raise Refused(502, "upstream", "the upstream switched protocols") from None
        except httptools.HttpParserError as exc:
            if self.done:  # garbage after a whole answer: the connection is not kept
                self.keep_alive = False
                return
            raise Refused(502, "upstream", f"malformed answer from the upstream: {exc}") from None


@dataclass
class Upstream:
    """A connection to one checked address; plain HTTP ones are kept for the next request."""

    key: tuple[IPAddress, int, str]
    link: Link
    answer: Answer | None = None  # to the request in flight

    def next_answer(self, head_only: bool) -> Answer:
        """The reader of the answer to the request about to go: the last one, its parser
        kept, when that answer ended by its framing on a kept connection; else a new one."""
        last = self.answer
        if last is not None and last.done and last.keep_alive:
            last.restart(head_only)
            return last
        self.answer = Answer(head_only)
        return self.answer

    def reusable(self) -> bool:
        """Whether another request may follow: the last answer ended by its framing, and
        neither side asked to close."""
        return (
            self.answer is not None
            and self.answer.done
            and self.answer.keep_alive
            and not self.link.at_eof()
            and not self.link.is_closing()
        )

    def close(self) -> None:
        self.link.close()


async def connect_checked(
    policy: ProxyPolicy,
    target: Target,
    exchange: Exchange,
    own: Callable[[], frozenset[IPAddress]],
    pool: dict[tuple[IPAddress, int, str], Upstream] | None = None,
    tls: ssl.SSLContext | None = None,
    decided: Verdict | None = None,
    names: Names | None = None,
) -> tuple[Upstream, Verdict]:
    """Decide (unless the caller has: `decided`), resolve, check every address, and connect
    to exactly the checked one.

    A kept connection is reused only when it goes to that same checked address and port.
    `names` holds the client connection's lookups: a tunnel's requests, all to one host,
    resolve it once per RESOLVED_FOR_S, and every address is still checked each time.
    """
    verdict = decided or policy.decide(target)
    exchange.host, exchange.rule, exchange.reason = verdict.host, verdict.rule, verdict.reason
    exchange.path = verdict.path or exchange.path  # the normal form, once there is one
    if not verdict.allowed:
        raise Refused(403, verdict.rule, verdict.reason)
    addresses = await _resolved(verdict.host, target.port, names)
    verdict, chosen = decide_addresses(verdict, addresses, own())
    if chosen is None:
        exchange.rule, exchange.reason = verdict.rule, verdict.reason
        raise Refused(403, verdict.rule, verdict.reason)
    # A TLS connection is kept for the one server name it was opened and checked for.
    key = (chosen, target.port, verdict.host if verdict.tls else "")
    kept = pool.pop(key, None) if pool is not None else None
    if kept is not None and not kept.link.at_eof() and not kept.link.is_closing():
        return kept, verdict
    context = (tls or ssl.create_default_context()) if verdict.tls else None
    try:
        link = await asyncio.wait_for(
            open_link(
                str(chosen),
                target.port,
                context,
                server_hostname=verdict.host if context else None,
            ),
            10,
        )
        return Upstream(key, link), verdict
    except ssl.SSLError as exc:
        raise Refused(502, "upstream-tls", f"TLS to {verdict.host} failed: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise Refused(502, "upstream", f"cannot connect to {chosen}:{target.port}: {exc}") from None


async def _resolved(host: str, port: int, names: Names | None) -> list[IPAddress]:
    if names is None:
        return await resolve(host, port)
    now = time.monotonic()
    known = names.get((host, port))
    if known is not None and known[0] > now:
        return known[1]
    addresses = await resolve(host, port)
    if addresses:  # a name that did not resolve is asked again next time
        if len(names) >= 64:
            names.clear()
        names[(host, port)] = (now + RESOLVED_FOR_S, addresses)
    return addresses


class _PastTheEnd(Exception):
    """Bytes after the end of an answer (raised from llhttp's callback, caught in _feed)."""
