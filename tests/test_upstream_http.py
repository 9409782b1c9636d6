"""The gateway's upstream side of HTTP/1.1: what an upstream answers is read strictly, and
nothing an upstream (or a credential) sends can split or smuggle a message."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.adapters.gateway.http import Refused
from orchestrator.adapters.gateway.upstream_http import (
    Answer,
    Head,
    chunk,
    field_value,
    request_head,
)


def read(data: bytes, head_only: bool = False, pieces: int = 1) -> tuple[list[object], Answer]:
    """Every event of the answer in `data`, fed in `pieces` parts, then the upstream closes."""

    async def go() -> tuple[list[object], Answer]:
        reader = asyncio.StreamReader()
        step = max(1, -(-len(data) // pieces))
        for start in range(0, len(data), step):
            reader.feed_data(data[start : start + step])
        reader.feed_eof()
        answer = Answer(head_only=head_only)
        events: list[object] = []
        while (event := await answer.next(reader)) is not None:
            events.append(event)
        return events, answer

    return asyncio.run(go())


def body(events: list[object]) -> bytes:
    return b"".join(e for e in events if isinstance(e, bytes))


@pytest.mark.parametrize("pieces", [1, 7, 1000])
def test_an_answer_is_read_the_same_however_it_arrives(pieces: int) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"
    events, answer = read(data, pieces=pieces)
    head = events[0]
    assert isinstance(head, Head) and head.status == 200 and head.reason == b"OK"
    assert head.headers == [(b"content-length", b"5"), (b"x-a", b"1")]
    assert body(events) == b"hello" and answer.done and answer.keep_alive


def test_chunked_answers_are_unframed_and_the_connection_kept() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"ab") + chunk(b"c")
    events, answer = read(data + b"0\r\n\r\n", pieces=5)
    assert body(events) == b"abc" and answer.keep_alive


def test_informational_answers_are_passed_over() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    events, answer = read(data)
    assert [e.status for e in events if isinstance(e, Head)] == [204]
    assert answer.done and answer.keep_alive


def test_an_answer_without_a_length_ends_when_the_upstream_closes() -> None:
    events, answer = read(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", pieces=3)
    assert body(events) == b"until the end" and answer.done and not answer.keep_alive


def test_the_answer_to_head_is_its_head_and_its_connection_is_not_kept() -> None:
    events, answer = read(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", head_only=True)
    assert len(events) == 1 and isinstance(events[0], Head)
    assert answer.done and not answer.keep_alive


def test_an_upstream_that_asks_to_close_is_not_kept() -> None:
    _, answer = read(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert answer.done and not answer.keep_alive


def test_bytes_after_an_answer_are_never_read_as_another() -> None:
    """A smuggled second answer behind the first is not passed on, and the connection it
    came on is not used again (the next request would otherwise read it)."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    for extra in (smuggled, b"garbage"):
        events, answer = read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
        assert [e.status for e in events if isinstance(e, Head)] == [200]
        assert body(events) == b"ok" and not answer.keep_alive


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
def test_an_answer_two_parsers_could_read_differently_is_refused(data: bytes) -> None:
    with pytest.raises(Refused) as refused:
        read(data)
    assert refused.value.status == 502 and refused.value.rule == "upstream"


def test_an_upstream_that_closes_inside_its_answer_is_not_taken_for_a_whole_one() -> None:
    with pytest.raises(ConnectionResetError):
        read(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")


def test_request_heads_carry_only_what_was_checked() -> None:
    head = request_head(b"GET", "/a?b=c", [(b"host", b"h"), (b"x-y", b"z")])
    assert head == b"GET /a?b=c HTTP/1.1\r\nhost: h\r\nx-y: z\r\n\r\n"
    # A credential's value is checked before it becomes a header: no line ends, no NUL.
    assert field_value(b"Bearer abc.def") and field_value(b"")
    for forged in (b"a\r\nX-Admin: 1", b"a\nb", b"a\rb", b"a\x00", b" leading", b"trailing "):
        assert not field_value(forged), forged
