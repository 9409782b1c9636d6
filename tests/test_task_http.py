"""The gateway's task side of HTTP/1.1: a request reads the same however its bytes arrive,
nothing a task sends can frame two requests as one (or one as two), and every answer says
where it ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.adapters.gateway.http import Refused
from orchestrator.adapters.gateway.task_http import Malformed, Request, TaskConnection
from orchestrator.adapters.gateway.upstream_http import chunk


def serve(*reads: bytes, then: Any = None) -> Any:
    """Run `then(connection)` on a task connection whose task sends `reads`, one read each,
    then closes."""

    async def go() -> Any:
        connection = TaskConnection(Reads(list(reads)))  # type: ignore[arg-type]
        return await then(connection)

    return asyncio.run(go())


class Reads:
    """A peer whose bytes arrive in the given reads, one by one, then end."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads

    async def read(self, _: int) -> bytes:
        return self.reads.pop(0) if self.reads else b""


async def whole(connection: TaskConnection) -> tuple[Request | None, bytes]:
    request = await connection.next_request()
    body = b""
    while request is not None and (piece := await connection.body()) is not None:
        body += piece
    return request, body


def split(data: bytes, pieces: int) -> list[bytes]:
    step = max(1, -(-len(data) // pieces))
    return [data[start : start + step] for start in range(0, len(data), step)]


@pytest.mark.parametrize("pieces", [1, 7, 1000])
def test_a_request_is_read_the_same_however_it_arrives(pieces: int) -> None:
    data = b"POST http://a.test/x?y=1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello"
    request, body = serve(*split(data, pieces), then=whole)
    assert request.method == b"POST" and request.target == b"http://a.test/x?y=1"
    assert request.headers == [(b"host", b"a.test"), (b"content-length", b"5")]
    assert body == b"hello" and not request.chunked and not request.http10


def test_a_chunked_body_is_unframed() -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += chunk(b"ab") + chunk(b"c") + b"0\r\n\r\n"
    request, body = serve(*split(data, 9), then=whole)
    assert request.chunked and body == b"abc"


def test_requests_one_after_another_share_the_connection() -> None:
    async def both(connection: TaskConnection) -> list[bytes]:
        targets = []
        for _ in range(2):
            request, _ = await whole(connection)
            assert request is not None
            connection.start(200, [(b"content-length", b"0")])
            connection.end()
            assert connection.reusable()
            targets.append(request.target)
        assert await connection.next_request() is None  # the task closed between requests
        return targets

    one = b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
    assert serve(one, one.replace(b"/one", b"/two"), then=both) == [b"/one", b"/two"]


def test_a_request_sent_before_the_last_is_answered_ends_the_connection() -> None:
    async def pipelined(connection: TaskConnection) -> None:
        request, _ = await whole(connection)
        assert request is not None and request.target == b"/one"
        connection.start(200, [(b"content-length", b"0")])
        connection.end()
        connection.reusable()

    get = b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
    with pytest.raises(Refused) as refused:
        serve(get + get.replace(b"/one", b"/two"), then=pipelined)
    assert refused.value.rule == "pipelining"


def test_the_bytes_after_a_connect_are_the_tunnels() -> None:
    async def tunnel(connection: TaskConnection) -> tuple[Request | None, bytes, bytes]:
        request = await connection.next_request()
        return request, connection.leftover, connection.start(200, [])

    hello = b"\x16\x03\x01\x00\x05hello"
    request, leftover, answer = serve(
        b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n" + hello, then=tunnel
    )
    assert request.method == b"CONNECT" and request.target == b"a.test:443"
    assert leftover == hello
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"  # no framing, no close


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "no Host header"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", "(?i)transfer.encoding"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", None),
        (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", None),
        (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", None),
    ],
    ids=["no host", "gzip", "control character", "bad target", "bad chunk", "bad length", "9.9"],
)
def test_malformed_requests_are_refused(data: bytes, why: str | None) -> None:
    with pytest.raises(Malformed, match=why):
        serve(data, then=whole)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent Length: 0\r\n\r\n",
    ],
    ids=["bare LF", "bare LFs only", "two lengths", "length and chunked", "space in a name"],
)
def test_framing_two_parsers_could_read_differently_is_refused(data: bytes) -> None:
    with pytest.raises(Refused) as refused:
        serve(data, then=whole)
    assert refused.value.rule == "smuggling"


def answered(request: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> Any:
    """The head, a piece and the end of an answer to `request`; whether another may follow."""

    async def answer(connection: TaskConnection) -> tuple[bytes, bool]:
        await whole(connection)
        out = connection.start(status, headers) + connection.piece(b"data") + connection.end()
        return out, connection.reusable()

    return serve(request, then=answer)


def test_an_answer_without_a_length_is_chunked_to_an_http11_task() -> None:
    out, again = answered(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200, [(b"x", b"1")])
    assert out == (
        b"HTTP/1.1 200 OK\r\nx: 1\r\ntransfer-encoding: chunked\r\n\r\n4\r\ndata\r\n0\r\n\r\n"
    )
    assert again


def test_an_answer_without_a_length_ends_an_http10_tasks_connection() -> None:
    out, again = answered(b"GET / HTTP/1.0\r\n\r\n", 200, [])
    assert out == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\ndata" and not again


def test_a_task_that_asks_to_close_is_answered_so() -> None:
    request = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    out, again = answered(request, 200, [(b"content-length", b"4")])
    assert b"\r\nconnection: close\r\n" in out and not again


def test_the_answer_to_head_and_204_have_no_body_framing() -> None:
    out, again = answered(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", 200, [])
    assert out.startswith(b"HTTP/1.1 200 OK\r\n\r\n") and again
    out, _ = answered(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 204, [])
    assert b"transfer-encoding" not in out


def test_an_upgrade_is_not_followed_but_the_connection_goes_on() -> None:
    async def both(connection: TaskConnection) -> bytes:
        request, _ = await whole(connection)
        assert request is not None
        connection.start(200, [(b"content-length", b"0")])
        connection.end()
        assert connection.reusable()
        after = await connection.next_request()
        assert after is not None
        return after.target

    upgrade = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert serve(upgrade, b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", then=both) == b"/next"
