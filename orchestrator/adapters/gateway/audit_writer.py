"""The gateway's audit writer: a process of its own that links, encodes and stores the
records its gateway hands over (`AuditLog.write_in_process`), so that the thread serving
requests pays only for the hand-over (one pickled batch per batch window), not for the
chain's canonical JSON, its hashes and the Redis round trip.

Its gateway sends batches of records over a socket pair; this process appends them to its
chain (`AuditLog.append_many`: one Redis script per batch) and anchors the head as it goes.
A flush is answered once everything sent before it is written and the head anchored. It
ignores SIGINT and SIGTERM: it ends when its gateway's end of the socket closes (the gateway
closed it, or died), after anchoring its head one last time, so the records a stopping
gateway hands over last are never cut off by a signal meant for the gateway.
"""

from __future__ import annotations

import logging
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from orchestrator.adapters.gateway.audit import AuditLog, WriterConfig
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.audit_key import AuditSigner
from orchestrator.adapters.vault.setup import connect

MAX_MERGED = 2000  # records written in one Redis call when the writer has fallen behind
log = logging.getLogger(__name__)


def serve(conn: Connection) -> None:
    """The writer process: batches in, appended to the chain, until the socket closes."""
    audit = _audit_log(conn.recv())
    records: list[dict[str, Any]] = []
    try:
        while True:
            message = conn.recv()
            if isinstance(message, str):  # a flush: answered with its token
                records = _write(audit, records)
                audit.anchor(force=True)
                conn.send(message)
                continue
            records += message
            # Behind its gateway: what has arrived meanwhile goes in the same Redis call.
            if len(records) >= MAX_MERGED or not conn.poll(0):
                records = _write(audit, records)
    except EOFError:
        _write(audit, records)
    audit.anchor(force=True)


def _write(audit: AuditLog, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append `records` (none left to write afterwards, even when Redis refused them)."""
    if records:
        try:
            audit.append_many(records)
        except Exception:  # Redis down: the records are lost, loudly
            log.exception("%d audit records of chain %s lost", len(records), audit.chain)
    return []


def _audit_log(config: WriterConfig) -> AuditLog:
    settings = config.settings
    store = Store(settings.redis_url, config.namespace, settings.record_ttl_s)
    signer = AuditSigner(connect(settings)) if config.signed else None
    return AuditLog(store, config.chain, signer, config.anchor_file)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="audit writer: %(levelname)s %(message)s")
    serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":
    main()
