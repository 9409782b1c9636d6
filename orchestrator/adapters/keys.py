"""Every Redis key Airlock uses, in one place (NS is the configured namespace).

NS:task:ID            hash    the record: state, reason, spec, timestamps, results
NS:task:ID:events     stream  every state change of the task, in order
NS:task:ID:logs       stream  stdout/stderr chunks, capped by the worker
NS:task:ID:signal     list    wake-ups for the worker running the task (cancel, exit)
NS:task:ID:ended      list    one element once the task has ended (waiters block on it)
NS:task:ID:owner      string  the running worker's heartbeat (expires when it stops)
NS:task:ID:alarms     list    security-relevant events (a refused second bootstrap)
NS:task:ID:egress     hash    allowed / denied egress decisions, counted
NS:tasks              zset    task ids by creation time, for listing
NS:events             stream  every state change of every task (capped), for watching
NS:pool               hash    ready warm runners, for watching
NS:member:KEY         string  the task a claimed warm runner serves
NS:credentials        set     task ids with journaled credentials
NS:cred:ID            hash    a task's journaled token accessor and JWT id
NS:cred:ID:leases     set     a task's journaled lease ids
NS:audit              stream  every egress decision, hash-chained
NS:audit:head:CHAIN   string  the last hash of one writer's chain
NS:audit:anchor:CHAIN string  a chain's latest signed head (also in each host's anchor file)
NS:audit:trim:CHAIN   string  where retention cut a chain (signed): its new genesis
NS:trace:TRACE_ID     list    the embedded span store, one list per trace
NS:caller:C:live      zset    a caller's tasks not yet ended (C is kind:name), for quotas
NS:caller:C:recent    zset    a caller's submissions of the last minute, for quotas
NS:idem:DIGEST        hash    an Idempotency-Key's task and request digest (24 h)
QUEUE                 list    a queue's messages on a Redis broker (kombu's key, no NS)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    ns: str

    def task(self, task_id: str, part: str = "") -> str:
        return f"{self.ns}:task:{task_id}" + (f":{part}" if part else "")

    @property
    def index(self) -> str:
        return f"{self.ns}:tasks"

    @property
    def live(self) -> str:
        """The tasks not yet ended (a sorted set by submit time): what the console's live
        view reads instead of every record."""
        return f"{self.ns}:tasks:live"

    @property
    def live_ready(self) -> str:
        """Set once the live index holds every live task (records made before it existed
        are added the first time it is read)."""
        return f"{self.ns}:tasks:live:ready"

    @property
    def events(self) -> str:
        return f"{self.ns}:events"

    @property
    def pool(self) -> str:
        return f"{self.ns}:pool"

    def member(self, key: str) -> str:
        return f"{self.ns}:member:{key}"

    @property
    def journal_index(self) -> str:
        return f"{self.ns}:credentials"

    def journal(self, task_id: str) -> str:
        return f"{self.ns}:cred:{task_id}"

    def journal_leases(self, task_id: str) -> str:
        return f"{self.ns}:cred:{task_id}:leases"

    @property
    def audit(self) -> str:
        return f"{self.ns}:audit"

    def audit_head(self, chain: str) -> str:
        return f"{self.ns}:audit:head:{chain}"

    def audit_mark(self, kind: str, chain: str) -> str:
        """A chain's signed mark: kind "anchor" or "trim"."""
        return f"{self.ns}:audit:{kind}:{chain}"

    def trace(self, trace_id: str) -> str:
        return f"{self.ns}:trace:{trace_id}"

    def caller(self, caller: str, part: str = "") -> str:
        return f"{self.ns}:caller:{caller}" + (f":{part}" if part else "")

    def idempotency(self, digest: str) -> str:
        return f"{self.ns}:idem:{digest}"

    @staticmethod
    def queue(name: str) -> str:
        """A queue's list on a Redis broker (kombu's, at the default priority): the queue's
        own name, outside the namespace, as every Celery worker expects it."""
        return name
