"""The audit log: every egress decision, append-only and hash-chained, in a Redis stream.

Each writer (a gateway) keeps its own chain: every record carries the hash of the one
before it in that chain, and the chain's head hash is stored beside the stream in the same
transaction. `verify` recomputes every chain: a changed record breaks its successor's link,
a removed record breaks the link across the gap, and a removed tail no longer matches the
stored head.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator.adapters.store import Store

GENESIS = "0" * 64
BATCH_WINDOW_S = 0.005
log = logging.getLogger(__name__)


def canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


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
    def __init__(self, store: Store, chain: str | None = None) -> None:
        self.store = store
        self.chain = chain or uuid.uuid4().hex[:12]
        self._head = GENESIS
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._drained = threading.Condition(self._pending_lock)

    def submit(self, record: dict[str, Any]) -> None:
        """Append in the background, in order, without holding up the request being served.

        A writer thread takes everything queued meanwhile and writes it in one transaction,
        so a busy gateway makes one Redis round trip per batch, not per request.
        """
        with self._pending_lock:
            self._pending += 1
        self._queue.put({**record, "time": record.get("time", time.time())})
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._write_loop, daemon=True, name="audit-writer"
                    )
                    self._thread.start()

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Gather what arrives in the next few milliseconds: one transaction for many
            # requests instead of one each (and less time taken from the serving thread).
            until = time.monotonic() + BATCH_WINDOW_S
            while len(batch) < 500 and (left := until - time.monotonic()) > 0:
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            try:
                self.append_many(batch)
            except Exception:  # Redis down: the records are lost, loudly
                log.exception("%d audit records lost", len(batch))
            with self._pending_lock:
                self._pending -= len(batch)
                if self._pending == 0:
                    self._drained.notify_all()

    def flush(self, timeout_s: float = 30) -> None:
        """Wait until every submitted record is written."""
        with self._pending_lock:
            self._drained.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def append(self, record: dict[str, Any]) -> str:
        """Add one record to this writer's chain now; returns its hash."""
        return self.append_many([record])[-1]

    def append_many(self, records: list[dict[str, Any]]) -> list[str]:
        """Add records to this writer's chain in one transaction; their hashes."""
        with self._lock:
            head, digests = self._head, []
            entries = []
            decided: collections.Counter[tuple[str, str]] = collections.Counter()
            for record in records:
                entry = {**record, "time": record.get("time", time.time()), "chain": self.chain}
                text = canonical(entry)
                digest = record_hash(head, entry, text)
                entries.append({"record": text, "prev": head, "hash": digest})
                head = digest
                digests.append(digest)
                if entry.get("task") and entry.get("decision") in ("allow", "deny"):
                    decided[(str(entry["task"]), str(entry["decision"]))] += 1
            self.store.append_audit(entries, self.chain, head, decided)
            self._head = head
            return digests

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

    def records(self, task: str | None = None, denied: bool = False) -> list[dict[str, Any]]:
        found = []
        for _, record, _, digest in self.entries():
            if task and record.get("task") != task:
                continue
            if denied and record.get("decision") != "deny":
                continue
            found.append({**record, "hash": digest})
        return found

    def verify(self) -> tuple[int, list[Problem]]:
        """Recompute every chain. Returns (records checked, problems found)."""
        heads: dict[str, str] = {}
        problems: list[Problem] = []
        count = 0
        for entry_id, record, prev, digest in self.entries():
            count += 1
            chain = str(record.get("chain"))
            expected_prev = heads.get(chain, GENESIS)
            if prev != expected_prev:
                problems.append(
                    Problem(
                        entry_id, chain, "link broken: a record before it was removed or changed"
                    )
                )
            if record_hash(prev, record) != digest:
                problems.append(Problem(entry_id, chain, "record changed after it was written"))
            heads[chain] = digest
        for chain, head in self.store.audit_heads().items():
            if head != heads.get(chain):
                problems.append(
                    Problem("-", chain, "chain ends early: its last records were removed")
                )
        return count, problems
