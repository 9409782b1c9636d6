"""The audit log: every egress decision, append-only and hash-chained, in a Redis stream.

Each writer (a gateway) keeps its own chain: every record carries its position (`seq`) and
the hash of the one before it in that chain, and the chain's head hash is stored beside the
stream in the same transaction. `verify` recomputes every chain: a changed record breaks its
successor's link, a removed record breaks the link across the gap, and a removed tail no
longer matches the stored head.

Redis alone cannot prove that much against someone who can write to it: they could rewrite
a chain and its head together, or delete both. So a writer with a signer also **anchors**
its head every few seconds: (chain, seq, head) signed by a Vault transit key that never
leaves Vault, kept in Redis and appended to this host's anchor file (outside Redis, append
only). `verify` checks every anchor's signature and that the chain still holds the anchored
record: a chain rewritten, cut short or wholly deleted since is found.

Retention (`trim`) removes the oldest records by age and size; per chain it leaves a signed
mark of the last removed record, which the first remaining record links to, so a trimmed
chain still verifies and a forged trim does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from orchestrator.adapters.store import AuditBatch, Store

GENESIS = "0" * 64
BATCH_WINDOW_S = 0.02
MAX_BATCH = 500
LINK_SLICE = 32  # records linked on the serving loop before it serves requests again
ANCHOR_EVERY_S = 2.0
log = logging.getLogger(__name__)


class Signer(Protocol):
    def sign(self, text: str) -> str: ...

    def verify(self, text: str, signature: str) -> bool: ...


@dataclass(frozen=True)
class Mark:
    """A signed statement about one chain: its record `seq` has hash `head`. An anchor says
    the chain reached that record; a trim mark says records up to it were removed."""

    chain: str
    seq: int
    head: str
    at: float
    ns: str = ""
    signature: str = ""

    def text(self, kind: str) -> str:
        """What is signed: everything but the signature, and what kind of mark it is."""
        fields = {k: v for k, v in self.__dict__.items() if k != "signature"}
        return canonical({"kind": kind, **fields})

    def signed(self, signature: str) -> Mark:
        return Mark(self.chain, self.seq, self.head, self.at, self.ns, signature)

    def to_json(self) -> str:
        return canonical(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Mark:
        data = json.loads(text)
        return cls(
            str(data["chain"]),
            int(data["seq"]),
            str(data["head"]),
            float(data["at"]),
            str(data.get("ns", "")),
            str(data.get("signature", "")),
        )


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
# orjson writes what it would be asked for as json would, not as a subclass or a date.
_FAST = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME


def canonical(record: dict[str, Any]) -> str:
    """The text a record is hashed as: json's, with sorted keys, no spaces, ASCII only.

    orjson writes it several times faster, and its text is taken only where it is provably
    json's own: printable ASCII throughout (json escapes DEL and anything beyond ASCII,
    orjson does not) and every float in the range where both write it without an exponent
    (they write exponents differently). Anything else is written by json.
    """
    try:
        fast = orjson.dumps(record, option=_FAST)
    except TypeError:  # beyond 64-bit integers, keys that are not strings, subclasses
        return _CANONICAL.encode(record)
    if fast.isascii() and b"\x7f" not in fast and _plain_floats(record):
        return fast.decode()
    return _CANONICAL.encode(record)


def _plain_floats(value: dict[str, Any] | list[Any] | tuple[Any, ...]) -> bool:
    for item in value.values() if isinstance(value, dict) else value:
        kind = type(item)
        if kind is str or kind is int or item is None or kind is bool:  # most of a record
            continue
        if isinstance(item, float):
            if not (item == 0 or 1e-4 <= abs(item) < 1e16):  # NaN and infinities fail too
                return False
        elif isinstance(item, (dict, list, tuple)) and not _plain_floats(item):
            return False
    return True


def record_hash(previous: str, record: dict[str, Any], text: str | None = None) -> str:
    """The chain link of `record` after `previous` (`text`: its canonical JSON, if known)."""
    text = canonical(record) if text is None else text
    return hashlib.sha256(f"{previous}\n{text}".encode()).hexdigest()


@dataclass(frozen=True)
class Problem:
    entry: str
    chain: str
    what: str


class AuditLog:
    def __init__(
        self,
        store: Store,
        chain: str | None = None,
        signer: Signer | None = None,
        anchor_file: Path | None = None,
    ) -> None:
        self.store = store
        self.chain = chain or uuid.uuid4().hex[:12]
        self.signer, self.anchor_file = signer, anchor_file
        self._head = GENESIS
        self._seq = 0
        self._anchored = (0, 0.0)  # (seq, monotonic time) of the last anchor
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._drained = threading.Condition(self._pending_lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False  # on a loop: its writer coroutine is scheduled or running
        self._in_flight = 0  # on a loop: records sent to Redis, not yet answered
        self._settled = False  # on a loop: it is about to stop; flush writes what is left

    def write_from(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write from `loop` (the gateway's serving loop), as a coroutine with an asyncio
        Redis client, instead of from a thread of its own: the thread serving requests then
        shares the GIL with no writer thread. Its owner lets it settle (`settled`) before
        the loop stops; what is left is written by `flush`."""
        self._loop = loop

    def submit(self, record: dict[str, Any]) -> None:
        """Append in the background, in order, without holding up the request being served.

        A writer (a thread, or a coroutine on the loop given to `write_from`) takes
        everything queued meanwhile and writes it in one transaction, so a busy gateway
        makes one Redis round trip per batch, not per request. The record is the log's from
        here on (it gets its time now, if it has none).
        """
        with self._pending_lock:
            self._pending += 1
        record.setdefault("time", time.time())
        self._queue.put(record)
        if self._loop is not None:
            self._wake_loop_writer(self._loop)
        elif self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._write_loop, daemon=True, name="audit-writer"
                    )
                    self._thread.start()

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            # Let what arrives in the next few milliseconds gather, asleep: one transaction
            # for many requests instead of one each, and one wake-up of this thread (each
            # takes the GIL from the thread serving requests) instead of one per record.
            time.sleep(BATCH_WINDOW_S)
            batch = [first, *self._take(MAX_BATCH - 1)]
            try:
                self.append_many(batch)
            except Exception:  # Redis down: the records are lost, loudly
                log.exception("%d audit records lost", len(batch))
            self._written(len(batch))

    def _take(self, most: int) -> list[dict[str, Any]]:
        """What is queued, up to `most` records, without waiting."""
        taken: list[dict[str, Any]] = []
        while len(taken) < most:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def _written(self, count: int) -> None:
        with self._pending_lock:
            self._pending -= count
            if self._pending == 0:
                self._drained.notify_all()

    def _wake_loop_writer(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._pending_lock:
            if self._writing or self._settled:
                return
            self._writing = True
        try:
            asyncio.run_coroutine_threadsafe(self._write_on_loop(), loop)
        except RuntimeError:  # the loop is closed: flush writes what is left
            with self._pending_lock:
                self._writing = False

    async def _write_on_loop(self) -> None:
        """The writer on the serving loop: a batch each BATCH_WINDOW_S while records come,
        gone when none do (the next record starts it again)."""
        while True:
            await asyncio.sleep(BATCH_WINDOW_S)
            batch = [] if self._settled else self._take(MAX_BATCH)
            if not batch:
                with self._pending_lock:
                    if self._queue.empty() or self._settled:
                        self._writing = False
                        return
                continue
            self._in_flight = len(batch)
            try:
                await self._append_on_loop(batch)
            except Exception:  # Redis down: the records are lost, loudly
                log.exception("%d audit records lost", len(batch))
            finally:
                self._in_flight = 0
                self._written(len(batch))
            if self._anchor_due():  # Vault signs: not on the loop
                asyncio.get_running_loop().run_in_executor(None, self.anchor)

    async def _append_on_loop(self, records: list[dict[str, Any]]) -> None:
        # The chain lock, taken without blocking the loop: a thread's own append (rare,
        # brief) finishes first; held until Redis has the batch, so no append links onto
        # a head Redis does not have yet.
        while not self._lock.acquire(blocking=False):
            await asyncio.sleep(0.001)
        try:
            entries: list[tuple[str, str, str]] = []
            head, seq = self._head, self._seq
            for start in range(0, len(records), LINK_SLICE):
                if start:
                    await asyncio.sleep(0)  # the requests waiting meanwhile are served first
                head, seq = self._link(records[start : start + LINK_SLICE], head, seq, entries)
            await self.store.append_audit_async(self._batch(records, entries, head))
            self._head, self._seq = head, seq
        finally:
            self._lock.release()

    async def settled(self, timeout_s: float = 10.0) -> None:
        """(On the writer's loop, before it stops) until every submitted record is written,
        or `timeout_s`; then the loop writes no more (`flush` writes what comes after) and
        its Redis connection is closed."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(BATCH_WINDOW_S)
        self._settled = True
        await self.store.close_async()

    def flush(self, timeout_s: float = 30) -> None:
        """Wait until every submitted record is written, and anchor the head. When the loop
        given to `write_from` no longer runs, what it left queued is written here."""
        if self._loop is not None and not self._loop.is_running():
            self._write_what_the_loop_left()
        with self._pending_lock:
            self._drained.wait_for(lambda: self._pending == 0, timeout=timeout_s)
        self.anchor(force=True)

    def _write_what_the_loop_left(self) -> None:
        if self._in_flight:
            log.error(
                "%d audit records were on their way to Redis when the gateway's loop stopped: "
                "not known to be written",
                self._in_flight,
            )
            self._written(self._in_flight)
            self._in_flight = 0
        while batch := self._take(MAX_BATCH):
            try:
                self.append_many(batch)
            except Exception:
                log.exception("%d audit records lost", len(batch))
            self._written(len(batch))

    def anchor(self, force: bool = False) -> Mark | None:
        """Sign this writer's head and keep it in Redis and the host's anchor file (at most
        every ANCHOR_EVERY_S unless `force`). Never raises: an anchor that could not be
        made is logged, and the next one covers it."""
        if self.signer is None:
            return None
        with self._lock:
            seq, head = self._seq, self._head
        if seq == self._anchored[0] or not (force or self._anchor_due()):
            return None
        mark = Mark(self.chain, seq, head, time.time(), self.store.keys.ns)
        try:
            mark = mark.signed(self.signer.sign(mark.text("anchor")))
            self.store.set_audit_mark("anchor", self.chain, mark.to_json())
        except Exception:  # Vault or Redis away: the file still gets nothing unsigned
            log.exception("audit anchor of chain %s at %d not made", self.chain, seq)
            return None
        if self.anchor_file is not None:
            try:
                self.anchor_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.anchor_file, "a", encoding="utf-8") as out:
                    out.write(mark.to_json() + "\n")
                    out.flush()
                    os.fsync(out.fileno())
            except OSError:
                log.exception("audit anchor file %s not written", self.anchor_file)
        self._anchored = (seq, time.monotonic())
        return mark

    def _anchor_due(self) -> bool:
        return self.signer is not None and time.monotonic() - self._anchored[1] >= ANCHOR_EVERY_S

    def append(self, record: dict[str, Any]) -> str:
        """Add one record to this writer's chain now; returns its hash."""
        return self.append_many([record])[-1]

    def append_many(self, records: list[dict[str, Any]]) -> list[str]:
        """Add records to this writer's chain in one transaction; their hashes."""
        entries: list[tuple[str, str, str]] = []
        with self._lock:
            head, seq = self._link(records, self._head, self._seq, entries)
            self.store.append_audit(self._batch(records, entries, head))
            self._head, self._seq = head, seq
        self.anchor()
        return [digest for _, _, digest in entries]

    def _link(
        self,
        records: list[dict[str, Any]],
        head: str,
        seq: int,
        entries: list[tuple[str, str, str]],
    ) -> tuple[str, int]:
        """Add `records` to `entries` as chain entries (canonical text, prev, hash) after
        `head` and `seq`; the head and sequence number they lead to (under the chain lock)."""
        for record in records:
            seq += 1
            entry = {
                **record,
                "time": record.get("time", time.time()),
                "chain": self.chain,
                "seq": seq,
            }
            text = canonical(entry)
            digest = record_hash(head, entry, text)
            entries.append((text, head, digest))
            head = digest
        return head, seq

    def _batch(
        self, records: list[dict[str, Any]], entries: list[tuple[str, str, str]], head: str
    ) -> AuditBatch:
        owners = [str(record.get("task") or "") for record in records]
        decisions = [str(record.get("decision") or "") for record in records]
        return AuditBatch(entries, self.chain, head, owners, decisions)

    def entries(self) -> Iterator[tuple[str, dict[str, Any], str, str]]:
        """(stream id, record, prev, hash), oldest first."""
        after = "-"
        while True:
            batch = self.store.audit_entries(after)
            for entry_id, fields in batch:
                if entry_id == after:
                    continue
                yield entry_id, json.loads(fields["record"]), fields["prev"], fields["hash"]
            if len(batch) < 1000:
                return
            after = batch[-1][0]

    def follow(
        self, after: str = "0", forever: bool = False
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(stream id, record with its hash) after stream id `after`; with `forever`, then
        each new one as it is written (within a second)."""
        while True:
            batch = self.store.audit_after(after, 1000 if forever else None)
            if not batch and not forever:
                return
            for entry_id, fields in batch:
                after = entry_id
                yield entry_id, {**json.loads(fields["record"]), "hash": fields["hash"]}

    def records(self, task: str | None = None, denied: bool = False) -> list[dict[str, Any]]:
        found = []
        for _, record, _, digest in self.entries():
            if task and record.get("task") != task:
                continue
            if denied and record.get("decision") != "deny":
                continue
            found.append({**record, "hash": digest})
        return found

    # -- retention ---------------------------------------------------------------------
    def trim(self, max_age_s: float | None = None, max_records: int | None = None) -> int:
        """Remove records older than `max_age_s` and beyond the newest `max_records`;
        how many went. Each trimmed chain gets a signed mark of its last removed record."""
        cut = self._cut(max_age_s, max_records)
        if cut is None:
            return 0
        last: dict[str, tuple[int, str]] = {}
        for entry_id, record, _, digest in self.entries():
            ms, _, sub = entry_id.partition("-")
            if (int(ms), int(sub)) >= cut:
                break
            last[str(record.get("chain"))] = (int(record.get("seq") or 0), digest)
        if not last:
            return 0
        for chain, (seq, head) in last.items():
            mark = Mark(chain, seq, head, time.time(), ns=self.store.keys.ns)
            if self.signer is not None:
                mark = mark.signed(self.signer.sign(mark.text("trim")))
            self.store.set_audit_mark("trim", chain, mark.to_json())
        return self.store.trim_audit(f"{cut[0]}-{cut[1]}")

    def _cut(self, max_age_s: float | None, max_records: int | None) -> tuple[int, int] | None:
        """The stream id (as numbers) before which retention removes records."""
        cuts = []
        if max_age_s is not None:
            cuts.append((int((time.time() - max_age_s) * 1000), 0))
        excess = self.store.audit_length() - max_records if max_records is not None else 0
        for n, (entry_id, *_) in enumerate(self.entries() if excess > 0 else (), 1):
            if n == excess:
                ms, _, sub = entry_id.partition("-")
                cuts.append((int(ms), int(sub) + 1))
                break
        return max(cuts) if cuts else None

    # -- verification --------------------------------------------------------------------
    def _marks(
        self, kind: str, problems: list[Problem], extra: list[str] | None = None
    ) -> dict[str, Mark]:
        """The latest valid mark of `kind` per chain (Redis, plus `extra` JSON lines)."""
        latest: dict[str, Mark] = {}
        for text in [*self.store.audit_marks(kind).values(), *(extra or [])]:
            try:
                mark = Mark.from_json(text)
            except (ValueError, KeyError, TypeError):
                problems.append(Problem("-", "?", f"an unreadable {kind} mark"))
                continue
            if mark.ns != self.store.keys.ns:
                continue
            if self.signer is not None and not self.signer.verify(mark.text(kind), mark.signature):
                problems.append(Problem("-", mark.chain, f"{kind} mark with a forged signature"))
                continue
            if mark.chain not in latest or mark.seq > latest[mark.chain].seq:
                latest[mark.chain] = mark
        return latest

    def _anchor_lines(self, problems: list[Problem]) -> list[str]:
        if self.anchor_file is None or not self.anchor_file.exists():
            return []
        try:
            return [line for line in self.anchor_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            problems.append(Problem("-", "?", f"anchor file {self.anchor_file}: {exc}"))
            return []

    def verify(self) -> tuple[int, list[Problem]]:
        """Recompute every chain, and hold it against its signed anchors and trim marks.
        Returns (records checked, problems found)."""
        problems: list[Problem] = []
        trims = self._marks("trim", problems)
        anchors = (
            self._marks("anchor", problems, self._anchor_lines(problems))
            if self.signer is not None
            else {}
        )
        heads: dict[str, str] = {}
        seqs: dict[str, int] = {}
        at_anchor: dict[str, str] = {}
        count = 0
        for entry_id, record, prev, digest in self.entries():
            count += 1
            chain = str(record.get("chain"))
            start = trims.get(chain)
            expected_prev = heads.get(chain, start.head if start else GENESIS)
            if prev != expected_prev:
                problems.append(
                    Problem(
                        entry_id, chain, "link broken: a record before it was removed or changed"
                    )
                )
            if record_hash(prev, record) != digest:
                problems.append(Problem(entry_id, chain, "record changed after it was written"))
            seq = int(record.get("seq") or seqs.get(chain, start.seq if start else 0) + 1)
            anchor = anchors.get(chain)
            if anchor is not None and seq == anchor.seq:
                at_anchor[chain] = digest
            heads[chain], seqs[chain] = digest, seq
        for chain, head in self.store.audit_heads().items():
            if head != heads.get(chain, trims[chain].head if chain in trims else None):
                problems.append(
                    Problem("-", chain, "chain ends early: its last records were removed")
                )
        problems += _against_anchors(anchors, trims, heads, at_anchor)
        return count, problems


def _against_anchors(
    anchors: dict[str, Mark], trims: dict[str, Mark], heads: dict[str, str], at: dict[str, str]
) -> list[Problem]:
    """What the chains as found say against their signed anchors."""
    problems = []
    for chain, anchor in anchors.items():
        if chain in trims and anchor.seq <= trims[chain].seq:
            continue  # removed by retention, under a signed trim mark
        if chain not in heads:
            problems.append(
                Problem("-", chain, f"chain deleted: it was anchored at record {anchor.seq}")
            )
        elif chain not in at:
            problems.append(Problem("-", chain, f"anchored record {anchor.seq} is gone"))
        elif at[chain] != anchor.head:
            problems.append(
                Problem("-", chain, f"record {anchor.seq} differs from its anchor: rewritten")
            )
    return problems
