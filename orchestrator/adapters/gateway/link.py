"""One connection of the gateway's, both ways: the few things it asks of asyncio's streams
(read what came, write, wait for the peer to take it, close, switch to TLS), done as a
protocol of its own.

A stream reader copies every arrival into a buffer and out again, and wakes its reader
through three layers; here the bytes that arrive while a read waits are handed to it as
they are, and only bytes that nobody waits for are kept (reading pauses past HIGH_WATER).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast

HIGH_WATER = 256 * 1024  # bytes kept unread before the transport stops reading


class Link(asyncio.Protocol):
    """A connection: `await read()` for the next bytes (b"" at the peer's end), `write`,
    `await drain()`, `close()`. Made by the loop (`create_connection`, a server's factory);
    a server's connection is served by `serve(link)`, a task of its own."""

    def __init__(self, serve: Callable[[Link], Coroutine[Any, Any, None]] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._serve = serve
        self._serving: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self._kept: deque[bytes] = deque()
        self._kept_bytes = 0
        self._waiter: asyncio.Future[bytes] | None = None
        self._eof = False
        self._lost = False  # the connection has ended
        self._reading_paused = False
        self._writing_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._over_tls = False

    # -- the loop's side ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._over_tls = transport.get_extra_info("sslcontext") is not None
        if self._serve is not None:
            self._serving = asyncio.get_running_loop().create_task(self._serve(self))
            self._serving.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.close()
        task.get_loop().call_exception_handler(
            {"message": "serving a connection failed", "exception": task.exception()}
        )

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._kept:
            self._waiter = None
            waiter.set_result(data)
            return
        self._kept.append(data)
        self._kept_bytes += len(data)
        if self._kept_bytes > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # A plain socket stays open for writing after the peer's half-close; TLS cannot.
        return not self._over_tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._wake()
        for drainer in self._drainers:
            if not drainer.done():
                drainer.set_exception(ConnectionResetError("connection lost"))
        self._drainers.clear()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for drainer in self._drainers:
            if not drainer.done():
                drainer.set_result(None)
        self._drainers.clear()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(b"")  # read() looks at what is kept, or at the end

    # -- the gateway's side ---------------------------------------------------------------
    async def read(self, most: int = 65536) -> bytes:
        """The next bytes, at most `most` of them; b"" once the peer has ended."""
        while True:
            if self._kept:
                return self._take(most)
            if self._eof:
                return b""
            if self._waiter is not None:
                raise RuntimeError("two reads of one connection at once")
            waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                data = await waiter
            except asyncio.CancelledError:  # what it was handed meanwhile is kept
                if not waiter.cancelled() and waiter.result():
                    self._kept.appendleft(waiter.result())
                    self._kept_bytes += len(waiter.result())
                raise
            finally:
                if self._waiter is waiter:
                    self._waiter = None
            if data:
                if len(data) <= most:
                    return data
                self._kept.appendleft(data)
                self._kept_bytes += len(data)

    def _take(self, most: int) -> bytes:
        data = self._kept.popleft()
        if len(data) > most:
            self._kept.appendleft(data[most:])
            data = data[:most]
        self._kept_bytes -= len(data)
        if self._reading_paused and self._kept_bytes <= HIGH_WATER // 4 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def at_eof(self) -> bool:
        return self._eof and not self._kept

    def write(self, data: bytes) -> None:
        """Send `data` (dropped once the connection is lost: `drain` says so)."""
        assert self.transport is not None
        if not self._lost:
            self.transport.write(data)

    async def drain(self) -> None:
        """Until the transport takes more (at once, unless the peer lags far behind);
        ConnectionResetError once the connection is lost."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._writing_paused:
            return
        drainer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drainers.append(drainer)
        await drainer

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self.transport is None else self.transport.get_extra_info(name, default)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Speak TLS as the server from here on (the peer's ClientHello is read by TLS,
        never by `read`)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(self.transport, self, context, server_side=True)
        self.transport, self._over_tls = cast(asyncio.Transport, tls), True


async def open_link(
    host: str, port: int, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> Link:
    """A connection to host:port (TLS with `tls`, verifying `server_hostname`)."""
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(
        Link, host, port, ssl=tls, server_hostname=server_hostname
    )
    return link
