"""The gateway's connections (link.py): nothing a peer sent is lost or reordered, a peer that
sends faster than the gateway reads is paused, and a lost connection is said so."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from orchestrator.adapters.gateway.link import HIGH_WATER, Link


def linked(test: Callable[[Link, socket.socket], Awaitable[None]]) -> None:
    """Run `test` on uvloop with a Link on one end of a socket pair, the other end plain."""

    async def go() -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        _, link = await asyncio.get_running_loop().create_unix_connection(Link, sock=ours)
        try:
            async with asyncio.timeout(10):  # a lost byte fails the test, never hangs it
                await test(link, theirs)
        finally:
            link.close()
            theirs.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(go())


async def send(peer: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(peer, data)


def test_bytes_arrive_in_order_whether_or_not_a_read_waits() -> None:
    async def test(link: Link, peer: socket.socket) -> None:
        reading = asyncio.ensure_future(link.read())
        await asyncio.sleep(0)
        await send(peer, b"first")
        assert await reading == b"first"  # handed to the waiting read
        await send(peer, b"second")
        await send(peer, b"third")
        await asyncio.sleep(0.05)  # kept meanwhile
        got = b""
        while len(got) < len(b"secondthird"):
            got += await link.read()
        assert got == b"secondthird"
        peer.shutdown(socket.SHUT_WR)
        assert await link.read() == b""
        assert link.at_eof()

    linked(test)


def test_a_read_takes_at_most_what_it_asks_for_and_the_rest_waits() -> None:
    async def test(link: Link, peer: socket.socket) -> None:
        await send(peer, b"abcdefgh")
        await asyncio.sleep(0.05)
        assert await link.read(3) == b"abc"
        assert await link.read(3) == b"def"
        assert await link.read(3) == b"gh"

    linked(test)


def test_a_cancelled_read_loses_nothing_it_was_handed() -> None:
    async def test(link: Link, peer: socket.socket) -> None:
        reading = asyncio.ensure_future(link.read())
        await asyncio.sleep(0)
        await send(peer, b"handed")
        # The bytes reach the waiting read; its task is cancelled before it runs again.
        while link._waiter is not None:
            await asyncio.sleep(0)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert await link.read() == b"handed"

    linked(test)


def test_a_peer_that_sends_faster_than_the_gateway_reads_is_paused() -> None:
    async def test(link: Link, peer: socket.socket) -> None:
        block = b"x" * 65536
        sent = 0
        sending = asyncio.ensure_future(send(peer, block * 64))  # 4 MiB, nobody reading
        await asyncio.sleep(0.3)
        transport = link.transport
        assert transport is not None
        assert not transport.is_reading()  # paused: the kernel's buffers hold the rest
        assert link._kept_bytes <= HIGH_WATER + 256 * 1024
        while sent < len(block) * 64:
            sent += len(await link.read())
        await sending
        assert transport.is_reading()

    linked(test)


def test_a_lost_connection_ends_reads_and_fails_drains() -> None:
    async def test(link: Link, peer: socket.socket) -> None:
        peer.close()
        assert await link.read() == b""
        link.write(b"anyone?")  # the peer is gone: this finds out
        for _ in range(100):
            if link._lost:
                break
            await asyncio.sleep(0.01)
        link.write(b"still?")  # dropped, not raised here
        with pytest.raises(ConnectionResetError):
            await link.drain()

    linked(test)
