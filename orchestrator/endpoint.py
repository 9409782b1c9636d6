"""Per-task endpoints: one unix socket per task, in a directory mounted into that task only.

The socket is the task's identity: whoever speaks on it speaks for that task and no other.
One asyncio loop (on its own thread) serves every task's socket of this worker; requests
are HTTP/1.1 parsed by h11 and answered by the task's handler on a thread pool, so a slow
Vault never stalls another task's endpoint.

    POST /v1/bootstrap          the task's JWT and wrapped secrets, exactly once
    POST /v1/wrapping/lookup    {"token"}: where a wrapping token was created
    POST /v1/wrapping/unwrap    {"token"}: unwrap one of this task's wrapped secrets
    CONNECT host:port           a byte tunnel, only to an address the task was granted
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import h11

log = logging.getLogger(__name__)
SOCKET_NAME = "airlock.sock"
MAX_BODY = 64 * 1024


class Handler(Protocol):
    def __call__(
        self, method: str, target: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Answer one JSON request of the task."""

    def tunnel(self, authority: str) -> tuple[str, int] | None:
        """Where a CONNECT tunnel to `authority` goes, or None if the task may not open it."""


class EndpointServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._loop = asyncio.new_event_loop()
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="airlock-endpoints"
        )
        self._thread.start()

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=30)

    def directory(self, task_id: str) -> Path:
        return self.root / task_id

    def open(self, task_id: str, handler: Handler) -> Path:
        """Create the task's socket; returns the directory to mount into its container."""
        directory = self.directory(task_id)
        directory.mkdir(parents=True, exist_ok=False)
        os.chmod(directory, 0o755)
        path = directory / SOCKET_NAME

        async def start() -> asyncio.AbstractServer:
            return await asyncio.start_unix_server(
                lambda r, w: self._serve(r, w, handler), path=str(path)
            )

        self._servers[task_id] = self._run(start())
        os.chmod(path, 0o666)  # the task's unprivileged user must be able to connect
        return directory

    def close(self, task_id: str) -> bool:
        """Stop serving the task and remove its directory; False if there was none."""
        server = self._servers.pop(task_id, None)
        if server is not None:
            server.close()
            self._run(server.wait_closed())
        directory = self.directory(task_id)
        existed = directory.exists()
        shutil.rmtree(directory, ignore_errors=True)
        return server is not None or existed

    def stale(self, live: Callable[[str], bool]) -> list[str]:
        """Endpoint directories on disk whose task is not live (left by a crashed worker)."""
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and not live(p.name)]

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            request, body = await self._read(conn, reader)
            if request is None:
                writer.close()
                return
            if request.method == b"CONNECT":
                target = handler.tunnel(request.target.decode())
                if target is not None:
                    await self._tunnel(conn, reader, writer, target)
                    return
                status, payload = 403, {"error": "this task may not connect there"}
            else:
                status, payload = await self._answer(request, body, handler)
        except (h11.RemoteProtocolError, ValueError) as exc:
            status, payload = 400, {"error": f"bad request: {exc}"}
        except Exception as exc:  # a failing handler must not take the loop down
            log.exception("endpoint handler failed")
            status, payload = 500, {"error": f"internal error: {exc.__class__.__name__}"}
        await _respond(conn, writer, status, payload)

    async def _tunnel(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: tuple[str, int],
    ) -> None:
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(*target), 10)
        except (TimeoutError, OSError) as exc:
            await _respond(conn, writer, 502, {"error": f"cannot reach {target[0]}:{target[1]}"})
            log.info("tunnel to %s:%s failed: %s", target[0], target[1], exc)
            return
        up_reader, up_writer = upstream
        writer.write(conn.send(h11.Response(status_code=200, headers=[])) or b"")
        leftover, _ = conn.trailing_data
        if leftover:
            up_writer.write(leftover)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def _read(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=10)
                conn.receive_data(chunk)
                if not chunk and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise ValueError("body too large")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return request, body

    async def _answer(
        self, request: h11.Request, body: bytes, handler: Handler
    ) -> tuple[int, dict[str, Any]]:
        try:
            document = json.loads(body) if body else {}
        except json.JSONDecodeError:
            return 400, {"error": "body is not JSON"}
        if not isinstance(document, dict):
            return 400, {"error": "body must be a JSON object"}
        method, target = request.method.decode(), request.target.decode()
        return await self._loop.run_in_executor(None, handler, method, target, document)

    def shutdown(self) -> None:
        for task_id in list(self._servers):
            self.close(task_id)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


async def _respond(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]
) -> None:
    data = json.dumps(payload).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
        ("connection", "close"),
    ]
    try:
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        writer.write(conn.send(h11.Data(data=data)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
    except (h11.LocalProtocolError, ConnectionError):
        pass
    finally:
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction of a tunnel until either side closes."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
