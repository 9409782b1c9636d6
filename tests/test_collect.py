"""Separating the runner's result frame from log text, and capping what is kept."""

from __future__ import annotations

import base64
import json
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.task.collect import LogPump, ResultScanner

MARKER = "0123abcd"


def frame(files: list[tuple[str, bytes]]) -> bytes:
    body = {
        "exit_code": 0,
        "files": [
            {"name": n, "size": len(d), "truncated": False, "data": base64.b64encode(d).decode()}
            for n, d in files
        ],
    }
    return b"\x1e" + MARKER.encode() + b" " + json.dumps(body).encode() + b"\n"


def scan(chunks: list[bytes], cap: int = 1 << 20) -> tuple[bytes, ResultScanner]:
    scanner = ResultScanner(MARKER, cap)
    text = b"".join(scanner.feed(c) for c in chunks) + scanner.finish()
    return text, scanner


def test_frame_is_removed_from_logs() -> None:
    text, scanner = scan([b"hello\n", frame([("r.txt", b"result")])])
    assert text == b"hello\n"
    assert [(f.name, f.data) for f in scanner.files()] == [("r.txt", b"result")]
    assert scanner.error is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=300), st.data())
def test_any_split_gives_the_same_result(
    before: bytes, payload: bytes, data: st.DataObject
) -> None:
    stream = before.replace(b"\x1e", b"") + frame([("o", payload)])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    text, scanner = scan(chunks)
    assert text == before.replace(b"\x1e", b"")
    assert scanner.files()[0].data == payload


def test_text_that_only_looks_like_a_frame_is_kept() -> None:
    text, scanner = scan([b"\x1ewrong-marker {}\n", b"\x1e0123"])
    assert text == b"\x1ewrong-marker {}\n\x1e0123"
    assert scanner.files() == []


def test_frame_over_its_cap_is_dropped() -> None:
    text, scanner = scan([frame([("big", b"x" * 5000)])], cap=1000)
    assert scanner.files() == [] and scanner.error == "result frame exceeded its size cap"
    assert text == b""


def test_malformed_and_cut_frames_are_reported() -> None:
    _, scanner = scan([b"\x1e" + MARKER.encode() + b" {nope\n"])
    assert scanner.error == "malformed result frame"
    _, scanner = scan([b"\x1e" + MARKER.encode() + b' {"files": []'])
    assert scanner.error == "result frame cut off"


def test_pump_batches_caps_and_decodes() -> None:
    written: list[tuple[str, str]] = []
    ended = threading.Event()
    snowman = "\u2603".encode()
    chunks = [
        ("stdout", b"a" * 50),
        ("stdout", snowman[:1]),
        ("stdout", snowman[1:]),
        ("stderr", b"warn\n"),
        ("stdout", b"b" * 100),
        ("stdout", frame([("f", b"1")])),
    ]
    scanner = ResultScanner(MARKER, 1 << 16)
    pump = LogPump(iter([chunks[:3], chunks[3:]]), scanner, written.extend, ended.set, max_bytes=60)
    pump.start()
    assert pump.join(timeout=5) and ended.is_set()
    text = "".join(t for s, t in written if s == "stdout")
    assert text.startswith("a" * 50 + "\u2603")
    assert pump.kept == 60 and pump.truncated
    assert sum(len(t.encode()) for _, t in written) == 60
    assert scanner.files()[0].data == b"1"


def test_pump_drains_to_the_end_when_the_sink_fails() -> None:
    written: list[tuple[str, str]] = []
    ended = threading.Event()

    def flaky(texts: list[tuple[str, str]]) -> None:
        if not written:
            written.append(("-", "-"))
            raise ConnectionError("store away")
        written.extend(texts)

    batches = [[("stdout", b"lost\n")], [("stdout", b"kept\n"), ("stdout", frame([("f", b"1")]))]]
    scanner = ResultScanner(MARKER, 1 << 16)
    pump = LogPump(iter(batches), scanner, flaky, ended.set, max_bytes=1000)
    pump.start()
    assert pump.join(timeout=5) and ended.is_set()
    assert written[1:] == [("stdout", "kept\n")]
    assert pump.dropped == 5 and pump.kept == 5
    assert scanner.files()[0].data == b"1"  # the result frame does not depend on the store
