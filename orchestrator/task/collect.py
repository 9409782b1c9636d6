"""Collecting what a running container says: its logs and its result frame.

The runner entrypoint ends stdout with one frame, `\\x1e<marker> <json>\\n`, carrying the
files of /workspace/output. The marker is a per-task nonce, so task output cannot forge
the frame by accident. ResultScanner separates that frame from the log text; LogPump moves
output from the engine into the store in batches, capped in size, on a thread of its own.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
FRAME_START = b"\x1e"


@dataclass(frozen=True)
class OutputFile:
    name: str
    size: int
    truncated: bool
    data: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "truncated": self.truncated,
            "data": base64.b64encode(self.data).decode("ascii"),
        }


def _suffix_prefix(buf: bytes | bytearray, token: bytes) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `token`."""
    for n in range(min(len(buf), len(token) - 1), 0, -1):
        if buf.endswith(token[:n]):
            return n
    return 0


class ResultScanner:
    """Splits a stdout byte stream into log bytes and the runner's result frame."""

    def __init__(self, marker: str, max_frame_bytes: int) -> None:
        self.token = FRAME_START + marker.encode() + b" "
        self.max_frame_bytes = max_frame_bytes
        self.frame: dict[str, Any] | None = None
        self.error: str | None = None
        self._buf = bytearray()
        self._frame = bytearray()
        self._in_frame = False

    def feed(self, data: bytes) -> bytes:
        """Consume a chunk; return the part of it (and of earlier chunks) that is log text."""
        self._buf += data
        out = bytearray()
        while self._buf:
            if self._in_frame:
                if not self._take_frame():
                    break
                continue
            at = self._buf.find(self.token)
            if at >= 0:
                out += self._buf[:at]
                del self._buf[: at + len(self.token)]
                self._in_frame = True
                continue
            keep = _suffix_prefix(self._buf, self.token)
            cut = len(self._buf) - keep
            out += self._buf[:cut]
            del self._buf[:cut]
            break
        return bytes(out)

    def _take_frame(self) -> bool:
        end = self._buf.find(b"\n")
        part = self._buf if end < 0 else self._buf[:end]
        if len(self._frame) + len(part) <= self.max_frame_bytes:
            self._frame += part
        else:
            self.error = "result frame exceeded its size cap"
        if end < 0:
            self._buf.clear()
            return False
        del self._buf[: end + 1]
        self._in_frame = False
        if self.error is None:
            self._parse(bytes(self._frame))
        self._frame.clear()
        return True

    def _parse(self, raw: bytes) -> None:
        try:
            frame = json.loads(raw)
            if not isinstance(frame, dict) or not isinstance(frame.get("files"), list):
                raise ValueError("not a frame")
            self.frame = frame
        except ValueError:
            self.error = "malformed result frame"

    def finish(self) -> bytes:
        """End of stream: whatever was held back is log text after all."""
        rest = bytes(self._buf)
        self._buf.clear()
        if self._in_frame:
            self.error = self.error or "result frame cut off"
        return rest

    def files(self) -> list[OutputFile]:
        if not self.frame:
            return []
        files = []
        for item in self.frame["files"]:
            try:
                data = base64.b64decode(item["data"], validate=True)
                files.append(
                    OutputFile(str(item["name"]), int(item["size"]), bool(item["truncated"]), data)
                )
            except (KeyError, TypeError, ValueError, binascii.Error):
                self.error = "malformed output file entry"
        return files


@dataclass
class LogPump:
    """Moves batches of (stream, bytes) chunks into `sink` until the stream ends, then calls
    `on_end`. One thread: each batch is what the engine had sent by the time it was read,
    so a chatty command costs one write per batch, not per chunk. Text beyond `max_bytes`
    is counted but not kept, and so is text the sink failed to take: the stream is always
    drained to its end, so a command never blocks on its output for long.
    """

    batches: Iterator[list[tuple[str, bytes]]]
    scanner: ResultScanner
    sink: Callable[[list[tuple[str, str]]], None]
    on_end: Callable[[], None]
    max_bytes: int
    kept: int = 0
    dropped: int = 0
    _decoders: dict[str, codecs.IncrementalDecoder] = field(default_factory=dict)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._pump, daemon=True, name="logpump")
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def _pump(self) -> None:
        try:
            for batch in self.batches:
                self._flush(batch, ended=False)
            self._flush([], ended=True)
        finally:
            self.on_end()

    def _flush(self, batch: list[tuple[str, bytes]], ended: bool) -> None:
        texts: list[tuple[str, str]] = []
        for stream, data in batch:
            if stream == "stdout":
                data = self.scanner.feed(data)
            self._keep(texts, stream, data, final=False)
        if ended:
            self._keep(texts, "stdout", self.scanner.finish(), final=True)
            self._keep(texts, "stderr", b"", final=True)
        texts = _coalesce(texts)
        if not texts:
            return
        try:
            self.sink(texts)
        except Exception as exc:  # the store is away: drop the text, keep draining the stream
            lost = sum(len(text.encode()) for _, text in texts)
            self.kept -= lost
            self.dropped += lost
            log.warning("output not stored (%d bytes dropped): %s", lost, exc)

    def _keep(self, texts: list[tuple[str, str]], stream: str, data: bytes, final: bool) -> None:
        decoder = self._decoders.setdefault(
            stream, codecs.getincrementaldecoder("utf-8")(errors="replace")
        )
        text = decoder.decode(data, final=final)
        if not text:
            return
        room = max(self.max_bytes - self.kept, 0)
        encoded = text.encode()
        if len(encoded) > room:
            self.dropped += len(encoded) - room
            text = encoded[:room].decode(errors="ignore")
        self.kept += len(text.encode())
        if text:
            texts.append((stream, text))


def _coalesce(texts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Join neighbouring chunks of the same stream into one entry."""
    merged: list[tuple[str, str]] = []
    for stream, text in texts:
        if merged and merged[-1][0] == stream:
            merged[-1] = (stream, merged[-1][1] + text)
        else:
            merged.append((stream, text))
    return merged
