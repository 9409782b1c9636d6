"""The one seam to Redis: task records, their event and log streams, worker signals, the
credential journal, the audit stream and the embedded span store.

Nothing else in Airlock talks to Redis; every key is built by `keys.Keys`, and every Redis
error becomes ServiceUnavailable here. State changes run as one Lua script: check the
current state, write, append the events.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec, TypeVar

import hiredis
import orjson
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.adapters.keys import Keys
from orchestrator.adapters.retry import ride_out
from orchestrator.core.lifecycle import SIGNAL_CANCEL, TERMINAL, Event, TaskState
from orchestrator.errors import IllegalTransition, ServiceUnavailable, TaskNotFound

P = ParamSpec("P")
R = TypeVar("R")
GLOBAL_EVENTS_MAXLEN = 10_000
MAX_BLOCK_MS = 10_000  # the longest a blocking read waits before returning empty
TASK_AUDIT_INDEX = 10_000  # how many of a task's audit entries its index keeps (the newest)

# A new pending task, with what its submission needs decided in the same step.
# KEYS: record, its events, the global events, the index, the live index; then, as ARGV
# says: the caller's live and recent sets, the Idempotency-Key's hash, the queue list.
# ARGV: now, task id, oldest live start kept ('' = no quota), concurrent, per minute, the
# caller sets' ttl, request digest ('' = no Idempotency-Key), its ttl, queue message ('' =
# not queued here), decision JSON without its closing brace ('' = none), the record's fields
# (a JSON object of strings: one argument, not two per field, is cheaper to send).
# Returns {'new'}, {'exists', state}, {'again', task, digest} or {'quota', running, recent}.
# Quotas count and admit in one step: concurrent submits cannot all slip under a limit.
_CREATE = (
    """
local now, id = ARGV[1], ARGV[2]
local k, live, recent, once, queue = 6
if ARGV[3] ~= '' then live, recent, k = KEYS[6], KEYS[7], 8 end
if ARGV[7] ~= '' then once, k = KEYS[k], k + 1 end
if ARGV[9] ~= '' then queue = KEYS[k] end
if once then
  local known = redis.call('HMGET', once, 'task', 'request')
  if known[1] then return {'again', known[1], known[2]} end
end
local current = redis.call('HGET', KEYS[1], 'state')
if current then return {'exists', current} end
local running, last = 0, 0
if live then
  redis.call('ZREMRANGEBYSCORE', live, '-inf', ARGV[3])
  redis.call('ZREMRANGEBYSCORE', recent, '-inf', now - 60)
  running, last = redis.call('ZCARD', live), redis.call('ZCARD', recent)
  if running >= tonumber(ARGV[4]) or last >= tonumber(ARGV[5]) then
    return {'quota', running, last}
  end
  for _, set in ipairs({live, recent}) do
    redis.call('ZADD', set, now, id)
    redis.call('EXPIRE', set, ARGV[6])
  end
end
local flat = {}
for name, value in pairs(cjson.decode(ARGV[11])) do
  flat[#flat + 1] = name
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[1], unpack(flat))
if ARGV[10] ~= '' then
  local usage = string.format('"usage":{"running":%%d,"last_minute":%%d}}', running, last)
  redis.call('HSET', KEYS[1], 'front_door', ARGV[10] .. ',' .. usage)
end
redis.call('ZADD', KEYS[4], now, id)
redis.call('ZADD', KEYS[5], now, id)
local ev = {'task', id, 'state', 'pending', 'reason', 'submitted', 'at', now}
redis.call('XADD', KEYS[2], '*', unpack(ev))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', %d, '*', unpack(ev))
if once then
  redis.call('HSET', once, 'task', id, 'request', ARGV[7])
  redis.call('EXPIRE', once, ARGV[8])
end
if queue then redis.call('LPUSH', queue, ARGV[9]) end
return {'new'}
"""
    % GLOBAL_EVENTS_MAXLEN
)


# ARGV: target, reason, now, ttl (0 = not terminal), owner heartbeat ms (0 = none), n,
# n allowed sources, field pairs...
_ADVANCE = (
    """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {0, false} end
local n = tonumber(ARGV[6])
local ok = false
for i = 7, 6 + n do if ARGV[i] == current then ok = true end end
if not ok then return {0, current} end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'reason', ARGV[2], 'updated_at', ARGV[3])
if #ARGV > 6 + n then redis.call('HSET', KEYS[1], unpack(ARGV, 7 + n)) end
local owner = tonumber(ARGV[5])
if owner > 0 then redis.call('SET', KEYS[7], '1', 'PX', owner) end
local ev = {'task', redis.call('HGET', KEYS[1], 'id'), 'state', ARGV[1], 'from', current,
            'reason', ARGV[2], 'at', ARGV[3]}
redis.call('XADD', KEYS[2], '*', unpack(ev))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', %d, '*', unpack(ev))
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  redis.call('DEL', KEYS[5], KEYS[6])
  redis.call('RPUSH', KEYS[6], ARGV[1])
  for i = 1, 2 do redis.call('EXPIRE', KEYS[i], ttl) end
  redis.call('EXPIRE', KEYS[4], ttl)
  redis.call('EXPIRE', KEYS[6], ttl)
  local id = redis.call('HGET', KEYS[1], 'id')
  local submitter = redis.call('HGET', KEYS[1], 'submitter')
  if submitter then
    redis.call('ZREM', KEYS[8] .. submitter .. ':live', id)
  end
  redis.call('ZREM', KEYS[9], id)
end
return {1, current}
"""
    % GLOBAL_EVENTS_MAXLEN
)


@dataclass(frozen=True)
class Quota:
    """A caller's limits, checked and counted as its task is recorded (`caller` as
    recorded: kind:name). Live entries older than `oldest_live` are dropped (no task lives
    that long); the caller's sets expire `ttl_s` after its last submit."""

    caller: str
    concurrent: int
    per_minute: int
    oldest_live: float
    ttl_s: int


@dataclass(frozen=True)
class Once:
    """An Idempotency-Key (`key`, already scoped to its caller) and the digest of the
    request it came with."""

    key: str
    request: str
    ttl_s: int


@dataclass(frozen=True)
class NewTask:
    """A task to record, with what its submission decides in the same step: the caller's
    `quota` counted and checked, the Idempotency-Key claimed (`once`), the broker `message`
    (queue, body) pushed, the front door's `decision` (a JSON object) recorded with the
    usage it was checked against."""

    task_id: str
    fields: Mapping[str, Any]
    quota: Quota | None = None
    once: Once | None = None
    message: tuple[str, str] | None = None
    decision: str | None = None


@dataclass(frozen=True)
class Made:
    """What recording a task came to: "new"; "exists" (detail: its state); "again" (the
    Idempotency-Key's first task and request digest); "quota" (running, last minute)."""

    outcome: str
    detail: tuple[str, ...] = ()


# Reads wait longer than any blocking call the store makes (MAX_BLOCK_MS at most).
_CLIENT_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "health_check_interval": 30,
    "socket_timeout": 60,
    "socket_connect_timeout": 5,
}


def _pack_with_hiredis(client: redis.asyncio.Redis) -> None:  # type: ignore[type-arg]
    """Have an asyncio client pack commands with hiredis, as the blocking client does (it
    packs in Python otherwise: a fifth of a millisecond for a submit's one call)."""
    base = client.connection_pool.connection_class

    class Packed(base):  # type: ignore[valid-type,misc]
        def pack_command(self, name: str, *args: Any) -> list[bytes]:
            # A two-word command ("SCRIPT LOAD") goes out as two words, as redis-py sends it.
            return [hiredis.pack_command((*name.split(), *args))]

    client.connection_pool.connection_class = Packed


def _guard(method: Callable[P, R]) -> Callable[P, R]:
    """Translate Redis connection failures into ServiceUnavailable at the seam, after riding
    out a restart for the store's `ride_out_s`."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        seconds = float(getattr(args[0], "ride_out_s", 0.0))
        try:
            return ride_out(lambda: method(*args, **kwargs), seconds, _unreachable)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ServiceUnavailable("redis", str(exc)) from exc

    return wrapper


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


# One audit writer's batch in one step: each record appended to the audit stream and
# indexed under its task, each task's allowed and denied requests counted, the writer's
# head moved. KEYS: the stream, the writer's head, then per task its egress counts and its
# index. ARGV: head, ttl, index length, then the records as one JSON array of, per record:
# record, prev, hash, the KEYS position of its task's counts (0: no task), its decision.
# A task's index grows by one RPUSH and its counts by one HINCRBY each, per batch.
_APPEND_AUDIT = """
local ttl, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
local items = cjson.decode(ARGV[4])
local ids, counts = {}, {}
for i = 1, #items, 5 do
  local id = redis.call('XADD', KEYS[1], '*', 'record', items[i], 'prev', items[i + 1],
                        'hash', items[i + 2])
  local slot = items[i + 3]
  if slot > 0 then
    local list = ids[slot]
    if not list then
      list = {}
      ids[slot], counts[slot] = list, {allow = 0, deny = 0}
    end
    list[#list + 1] = id
    local decision = items[i + 4]
    if decision == 'allow' or decision == 'deny' then
      counts[slot][decision] = counts[slot][decision] + 1
    end
  end
end
for slot, list in pairs(ids) do
  for first = 1, #list, 500 do
    redis.call('RPUSH', KEYS[slot + 1], unpack(list, first, math.min(first + 499, #list)))
  end
  for decision, n in pairs(counts[slot]) do
    if n > 0 then
      redis.call('HINCRBY', KEYS[slot], decision, n)
    end
  end
  redis.call('LTRIM', KEYS[slot + 1], -keep, -1)
  redis.call('EXPIRE', KEYS[slot + 1], ttl)
  redis.call('EXPIRE', KEYS[slot], ttl)
end
redis.call('SET', KEYS[2], ARGV[1])
"""


class AuditBatch(NamedTuple):
    """One audit writer's batch: its chained entries (canonical record, prev, hash), the
    chain and the head they lead to, and each entry's task ("" for none) and decision."""

    entries: list[tuple[str, str, str]]
    chain: str
    head: str
    owners: list[str]
    decisions: list[str]


class Store:
    def __init__(
        self,
        url: str,
        namespace: str = "airlock",
        record_ttl_s: int = 7 * 24 * 3600,
        clock: Callable[[], float] = time.time,
        ride_out_s: float = 0.0,
    ) -> None:
        """`ride_out_s`: how long a call keeps retrying while Redis is unreachable (a worker
        rides out a Redis restart; the CLI answers at once)."""
        self.url = url
        # Repeating is ride_out's, in _guard: never a second run of a script that may have run.
        self.redis = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **_CLIENT_OPTIONS)
        self.keys = Keys(namespace)
        self.ns = namespace
        self.record_ttl_s = record_ttl_s
        self.clock = clock
        self.ride_out_s = ride_out_s
        self._create = self.redis.register_script(_CREATE)
        # Per loop: its asyncio client, and the scripts registered on it by source.
        self._async_clients: weakref.WeakKeyDictionary[Any, tuple[Any, dict[str, Any]]] = (
            weakref.WeakKeyDictionary()
        )
        self._advance = self.redis.register_script(_ADVANCE)
        self._append_audit = self.redis.register_script(_APPEND_AUDIT)

    def key(self, task_id: str, part: str = "") -> str:
        return self.keys.task(task_id, part)

    @property
    def index_key(self) -> str:
        return self.keys.index

    @property
    def events_key(self) -> str:
        return self.keys.events

    # -- records ----------------------------------------------------------------------
    @_guard
    def ping(self) -> None:
        self.redis.ping()

    def create(self, task_id: str, fields: Mapping[str, Any]) -> bool:
        """Record a new pending task. False if it already exists (a redelivered message)."""
        return self.record(task_id, fields) is None

    def record(self, task_id: str, fields: Mapping[str, Any]) -> TaskState | None:
        """Record a new pending task, in one round trip with finding out whether it existed:
        None if it was recorded now, else the state the existing record is in."""
        made = self.submit(NewTask(task_id, fields))
        return TaskState(made.detail[0]) if made.outcome == "exists" else None

    @_guard
    def submit(self, new: NewTask) -> Made:
        """Record a new pending task, in one step with everything its submission decides
        (see NewTask). Nothing is written unless the outcome is "new"."""
        outcome, *detail = self._create(*self._create_call(new))
        return Made(str(outcome), tuple(str(d) for d in detail))

    async def submit_async(self, new: NewTask) -> Made:
        """`submit` without blocking the event loop (for the API)."""
        try:
            outcome, *detail = await self._async_script(_CREATE)(*self._create_call(new))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ServiceUnavailable("redis", str(exc)) from exc
        return Made(str(outcome), tuple(str(d) for d in detail))

    def _async_script(self, source: str) -> Any:
        """A script on an asyncio client of the running loop (a client's connections belong
        to the loop they were made in)."""
        loop = asyncio.get_running_loop()
        if loop not in self._async_clients:
            client = redis.asyncio.Redis.from_url(
                self.url, retry=AsyncRetry(NoBackoff(), 0), **_CLIENT_OPTIONS
            )
            _pack_with_hiredis(client)
            self._async_clients[loop] = (client, {})
        client, scripts = self._async_clients[loop]
        if source not in scripts:
            scripts[source] = client.register_script(source)
        return scripts[source]

    def _create_call(self, new: NewTask) -> tuple[list[str], list[Any]]:
        now = self.clock()
        fields = dict(_pairs(new.fields))
        fields.update(
            id=new.task_id,
            state=TaskState.PENDING.value,
            reason="submitted",
            created_at=str(now),
            updated_at=str(now),
        )
        task_id, quota, once, message = new.task_id, new.quota, new.once, new.message
        keys = [
            self.key(task_id),
            self.key(task_id, "events"),
            self.events_key,
            self.index_key,
            self.keys.live,
        ]
        limits: list[Any] = ["", 0, 0, 0]
        if quota is not None:
            keys += [self.keys.caller(quota.caller, part) for part in ("live", "recent")]
            limits = [quota.oldest_live, quota.concurrent, quota.per_minute, quota.ttl_s]
        claim: list[Any] = ["", 0]
        if once is not None:
            keys.append(self.keys.idempotency(once.key))
            claim = [once.request, once.ttl_s]
        if message is not None:
            keys.append(self.keys.queue(message[0]))
        # The decision's JSON, open at its end: the script closes it with the usage.
        opened = new.decision.rstrip()[:-1] if new.decision else ""
        body = message[1] if message else ""
        record = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        return keys, [now, task_id, *limits, *claim, body, opened, record]

    @_guard
    def forget_idempotent(self, key: str) -> None:
        self.redis.delete(self.keys.idempotency(key))

    @_guard
    def get(self, task_id: str) -> dict[str, str]:
        """The raw record. Raises TaskNotFound."""
        record: dict[str, str] = self.redis.hgetall(self.key(task_id))
        if not record:
            raise TaskNotFound(task_id)
        return record

    @_guard
    def update(self, task_id: str, fields: Mapping[str, Any]) -> None:
        """Write result fields; never the state (that goes through lifecycle.advance)."""
        if "state" in fields:
            raise ValueError("state changes go through lifecycle.advance")
        if fields:
            self.redis.hset(self.key(task_id), mapping=dict(_pairs(fields)))

    @_guard
    def compare_and_set_state(
        self,
        task_id: str,
        sources: frozenset[TaskState],
        target: TaskState,
        reason: str,
        fields: Mapping[str, Any],
        owner_s: float = 0,
    ) -> TaskState:
        """Move the task from one of `sources` to `target` with `fields`, in one step; with
        `owner_s`, also the worker's first heartbeat (see `heartbeat`)."""
        ttl = self.record_ttl_s if target in TERMINAL else 0
        keys = [
            self.key(task_id),
            self.key(task_id, "events"),
            self.events_key,
            self.key(task_id, "logs"),
            self.key(task_id, "signal"),
            self.key(task_id, "ended"),
            self.key(task_id, "owner"),
            self.keys.caller(""),
            self.keys.live,
        ]
        args = [
            target.value,
            reason,
            self.clock(),
            ttl,
            max(int(owner_s * 1000), 1) if owner_s > 0 else 0,
            len(sources),
            *sorted(s.value for s in sources),
            *_flatten(fields),
        ]
        ok, current = self._advance(keys=keys, args=args)
        if current is None:
            raise TaskNotFound(task_id)
        if not ok:
            raise IllegalTransition(task_id, current, target.value)
        return TaskState(current)

    @_guard
    def recent(self, limit: int = 100, offset: int = 0) -> list[dict[str, str]]:
        """The most recent records (after the newest `offset`), newest first; ids whose
        record expired are pruned."""
        ids: list[str] = self.redis.zrevrange(self.index_key, offset, offset + limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.key(task_id))
        records = pipe.execute()
        gone = [task_id for task_id, rec in zip(ids, records, strict=True) if not rec]
        if gone:
            self.redis.zrem(self.index_key, *gone)
        return [rec for rec in records if rec]

    @_guard
    def live_records(self) -> list[dict[str, str]]:
        """The records of tasks not yet ended, oldest first, from the live index (a few
        reads however many tasks are recorded); ids that ended or expired are pruned."""
        if not self.redis.exists(self.keys.live_ready):
            self._backfill_live()
        ids: list[str] = self.redis.zrange(self.keys.live, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.key(task_id))
        records = pipe.execute()
        live = [r for r in records if r and TaskState(r["state"]) not in TERMINAL]
        gone = [i for i, r in zip(ids, records, strict=True) if r not in live]
        if gone:
            self.redis.zrem(self.keys.live, *gone)
        return live

    def _backfill_live(self) -> None:
        """Once per deployment: the live tasks recorded before the live index existed."""
        live = list(self.live_tasks())
        if live:
            pipe = self.redis.pipeline(transaction=False)
            for task_id in live:
                pipe.zscore(self.index_key, task_id)
            scores = pipe.execute()
            self.redis.zadd(
                self.keys.live,
                {task_id: score or 0.0 for task_id, score in zip(live, scores, strict=True)},
            )
        self.redis.set(self.keys.live_ready, "1")

    @_guard
    def live_tasks(self) -> dict[str, TaskState]:
        """Every recorded task that has not ended, with its state."""
        ids: list[str] = self.redis.zrange(self.index_key, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(self.key(task_id), "state")
        states = pipe.execute()
        return {
            task_id: TaskState(state)
            for task_id, state in zip(ids, states, strict=True)
            if state and TaskState(state) not in TERMINAL
        }

    # -- events -----------------------------------------------------------------------
    @_guard
    def note(self, task_id: str, reason: str) -> None:
        """An event that is not a state change (what the reaper did for an ended task, say)."""
        state = self.redis.hget(self.key(task_id), "state")
        if not state:
            return
        event = {
            "task": task_id,
            "state": state,
            "from": state,
            "reason": reason,
            "at": self.clock(),
        }
        pipe = self.redis.pipeline()
        pipe.xadd(self.key(task_id, "events"), event)
        pipe.xadd(self.events_key, event, maxlen=GLOBAL_EVENTS_MAXLEN, approximate=True)
        pipe.execute()

    @_guard
    def events(self, task_id: str, after: str = "0", block_ms: int | None = None) -> list[Event]:
        """Events of one task after stream id `after`; waits up to `block_ms` for the first."""
        key = self.key(task_id, "events")
        answer = self.redis.xread({key: after}, block=_capped(block_ms))
        return [_event(entry_id, data) for _, entries in answer for entry_id, data in entries]

    @_guard
    def wait_ended(self, task_id: str, block_ms: int) -> bool:
        """Whether the task has ended, waiting up to `block_ms` for it to. Any number of
        waiters: each takes the one element and puts it straight back (a rotation)."""
        key = self.key(task_id, "ended")
        wait_s = max(min(block_ms, MAX_BLOCK_MS), 1) / 1000
        return self.redis.blmove(key, key, wait_s, "RIGHT", "LEFT") is not None

    @_guard
    def all_events(self, after: str = "$", block_ms: int | None = None) -> list[Event]:
        answer = self.redis.xread({self.events_key: after}, block=_capped(block_ms), count=1000)
        return [_event(entry_id, data) for _, entries in answer for entry_id, data in entries]

    # -- logs -------------------------------------------------------------------------
    @_guard
    def append_log(self, task_id: str, stream: str, text: str) -> None:
        self.redis.xadd(self.key(task_id, "logs"), {"s": stream, "d": text})

    @_guard
    def logs(
        self, task_id: str, after: str = "0", block_ms: int | None = None
    ) -> list[tuple[str, str, str]]:
        """(entry id, stream name, text) chunks after `after`."""
        answer = self.redis.xread({self.key(task_id, "logs"): after}, block=_capped(block_ms))
        return [(eid, d["s"], d["d"]) for _, entries in answer for eid, d in entries]

    def iter_logs(self, task_id: str) -> Iterator[tuple[str, str]]:
        after = "0"
        while chunk := self.logs(task_id, after):
            for after, stream, text in chunk:
                yield stream, text

    # -- signals to the worker ----------------------------------------------------------
    def request_cancel(self, task_id: str, by: str) -> None:
        """Ask the worker running the task to cancel it, as `by` (it stops the container)."""
        self.update(task_id, {"cancel_requested_by": by})
        self.signal(task_id, SIGNAL_CANCEL)

    @_guard
    def signal(self, task_id: str, value: str) -> None:
        key = self.key(task_id, "signal")
        pipe = self.redis.pipeline()
        pipe.rpush(key, value)
        pipe.expire(key, self.record_ttl_s)
        pipe.execute()

    @_guard
    def wait_signal(self, task_id: str, timeout_s: float) -> str | None:
        """Block until a signal arrives or `timeout_s` passes (None)."""
        wait_s = min(max(timeout_s, 0.01), MAX_BLOCK_MS / 1000)
        answer = self.redis.blpop([self.key(task_id, "signal")], timeout=wait_s)
        return None if answer is None else str(answer[1])

    @_guard
    def take_signal(self, task_id: str) -> str | None:
        value = self.redis.lpop(self.key(task_id, "signal"))
        return None if value is None else str(value)

    # -- ownership ------------------------------------------------------------------------
    @_guard
    def heartbeat(self, task_id: str, ttl_s: float) -> None:
        """The worker running the task is alive; the key lapses if it stops saying so."""
        self.redis.set(self.key(task_id, "owner"), "1", px=max(int(ttl_s * 1000), 1))

    @_guard
    def has_owner(self, task_id: str) -> bool:
        return bool(self.redis.exists(self.key(task_id, "owner")))

    # -- warm pool ------------------------------------------------------------------------
    @_guard
    def pool_register(self, member: str, fields: Mapping[str, Any]) -> None:
        """A ready member (shown by `airlock watch`)."""
        self.redis.hset(self.keys.pool, member, json.dumps(dict(fields)))

    @_guard
    def pool_forget(self, member: str) -> None:
        self.redis.hdel(self.keys.pool, member)

    @_guard
    def pool_members(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.redis.hgetall(self.keys.pool).items()}

    @_guard
    def pool_claimed(self, member: str, task_id: str) -> None:
        """The member now runs this task: the reaper judges its container by the task."""
        self.redis.set(self.keys.member(member), task_id, ex=self.record_ttl_s)

    @_guard
    def pool_task(self, member: str) -> str | None:
        task_id: str | None = self.redis.get(self.keys.member(member))
        return task_id

    # -- credential journal -------------------------------------------------------------
    # Written before a credential is handed out, removed only after its revocation was
    # verified: what a crashed worker minted can always be found and revoked.
    @_guard
    def journal(
        self, task_id: str, on_task: Mapping[str, Any] | None = None, **fields: Any
    ) -> None:
        """Journal what was minted for the task; `on_task` goes on its record at once."""
        pipe = self.redis.pipeline()
        pipe.hset(self.keys.journal(task_id), mapping=dict(_pairs(fields)))
        pipe.sadd(self.keys.journal_index, task_id)
        if on_task:
            pipe.hset(self.key(task_id), mapping=dict(_pairs(on_task)))
        pipe.execute()

    @_guard
    def journal_lease(self, task_id: str, lease_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.sadd(self.keys.journal_leases(task_id), lease_id)
        pipe.sadd(self.keys.journal_index, task_id)
        pipe.execute()

    @_guard
    def journaled(self, task_id: str) -> tuple[dict[str, str], set[str]]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.journal(task_id))
        pipe.smembers(self.keys.journal_leases(task_id))
        fields, leases = pipe.execute()
        return dict(fields), set(leases)

    @_guard
    def journaled_tasks(self) -> set[str]:
        return set(self.redis.smembers(self.keys.journal_index))

    @_guard
    def forget_credentials(self, task_id: str, leases: set[str] | None = None) -> None:
        """Drop journal entries whose revocation was verified (all of them by default)."""
        if leases is not None:
            if leases:
                self.redis.srem(self.keys.journal_leases(task_id), *leases)
            return
        pipe = self.redis.pipeline()
        pipe.delete(self.keys.journal(task_id), self.keys.journal_leases(task_id))
        pipe.srem(self.keys.journal_index, task_id)
        pipe.execute()

    @_guard
    def alarm(self, task_id: str, text: str) -> None:
        """A security-relevant event on a task (a refused second bootstrap, say)."""
        key = self.key(task_id, "alarms")
        pipe = self.redis.pipeline()
        pipe.rpush(key, json.dumps({"at": self.clock(), "alarm": text}))
        pipe.expire(key, self.record_ttl_s)
        pipe.execute()

    @_guard
    def alarms(self, task_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(self.key(task_id, "alarms"), 0, -1)]

    # -- egress audit -----------------------------------------------------------------------
    @_guard
    def append_audit(self, batch: AuditBatch) -> None:
        """Append one writer's chained records (record, prev, hash), move its head, index
        each record under its task (`owners`: a task id or "" per entry) so that a task's
        decisions are found without reading the whole audit, and count each task's
        decisions: one script, one round trip. The index is a view: the chain is the record."""
        self._append_audit(*self._audit_call(batch))

    async def append_audit_async(self, batch: AuditBatch) -> None:
        """`append_audit` without blocking the event loop (for the gateway's loop)."""
        await self._async_script(_APPEND_AUDIT)(*self._audit_call(batch))

    async def close_async(self) -> None:
        """Close the running loop's asyncio client, if it has one (before the loop stops:
        a loop does not close around a client's open connection)."""
        made = self._async_clients.pop(asyncio.get_running_loop(), None)
        if made is not None:
            await made[0].aclose()

    def _audit_call(self, batch: AuditBatch) -> tuple[list[str], list[Any]]:
        """The append script's keys and arguments. The entries go as one JSON argument (one
        to encode, not five per entry); records are canonical JSON, ASCII only, so what the
        script stores is byte for byte what was hashed."""
        keys = [self.keys.audit, self.keys.audit_head(batch.chain)]
        slots: dict[str, int] = {}
        items: list[str | int] = []
        for (record, prev, digest), task_id, decision in zip(
            batch.entries, batch.owners, batch.decisions, strict=True
        ):
            slot = slots.get(task_id, 0) if task_id else 0
            if task_id and not slot:
                slot = slots[task_id] = len(keys) + 1
                keys += [self.keys.task(task_id, "egress"), self.keys.task(task_id, "audit")]
            items += [record, prev, digest, slot, decision]
        return keys, [batch.head, self.record_ttl_s, TASK_AUDIT_INDEX, orjson.dumps(items)]

    @_guard
    def task_audit(self, task_id: str, count: int) -> list[tuple[str, dict[str, str]]]:
        """The task's newest `count` audit entries, oldest first, through its index."""
        ids: list[str] = self.redis.lrange(self.keys.task(task_id, "audit"), -count, -1)
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.keys.audit, min=entry_id, max=entry_id)
        return [found[0] for found in pipe.execute() if found]

    @_guard
    def audit_newest(
        self, before: str = "+", count: int = 1000
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` audit entries from stream id `before` back (inclusive), newest first."""
        entries: list[tuple[str, dict[str, str]]] = self.redis.xrevrange(
            self.keys.audit, max=before, count=count
        )
        return entries

    @_guard
    def audit_entries(
        self, after: str = "-", count: int = 1000
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` audit entries from stream id `after` on (inclusive), oldest first."""
        entries: list[tuple[str, dict[str, str]]] = self.redis.xrange(
            self.keys.audit, min=after, count=count
        )
        return entries

    @_guard
    def audit_after(
        self, last_id: str, block_ms: int | None, count: int = 1000
    ) -> list[tuple[str, dict[str, str]]]:
        """Audit entries after stream id `last_id` ("0" for all), waiting up to `block_ms`
        for one to arrive (None: not at all)."""
        answer = self.redis.xread({self.keys.audit: last_id}, count=count, block=block_ms)
        return list(answer[0][1]) if answer else []

    @_guard
    def audit_heads(self) -> dict[str, str]:
        """Every writer's chain and its stored head hash."""
        found = {}
        for key in self.redis.scan_iter(self.keys.audit_head("*")):
            found[key.rsplit(":", 1)[1]] = self.redis.get(key) or ""
        return found

    @_guard
    def audit_marks(self, kind: str) -> dict[str, str]:
        """Every chain's signed mark of `kind` ("anchor" or "trim"), as stored."""
        found = {}
        for name in self.redis.scan_iter(self.keys.audit_mark(kind, "*")):
            found[name.rsplit(":", 1)[1]] = self.redis.get(name) or ""
        return found

    @_guard
    def set_audit_mark(self, kind: str, chain: str, document: str) -> None:
        self.redis.set(self.keys.audit_mark(kind, chain), document)

    @_guard
    def audit_length(self) -> int:
        return int(self.redis.xlen(self.keys.audit))

    @_guard
    def trim_audit(self, min_id: str) -> int:
        """Remove audit entries older than stream id `min_id`; how many went."""
        return int(self.redis.xtrim(self.keys.audit, minid=min_id, approximate=False))

    @_guard
    def egress_counts(self, task_ids: list[str]) -> list[dict[str, int]]:
        """Allowed and denied egress decisions of each task, in order."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(self.keys.task(task_id, "egress"))
        return [{k: int(v) for k, v in counts.items()} for counts in pipe.execute()]

    # -- the embedded span store ----------------------------------------------------------
    @_guard
    def append_spans(self, by_trace: Mapping[str, list[str]], keep: int, ttl_s: int) -> None:
        """Add spans (JSON) to their traces' lists, keeping the last `keep` of each."""
        pipe = self.redis.pipeline(transaction=False)
        for trace_id, records in by_trace.items():
            key = self.keys.trace(trace_id)
            pipe.rpush(key, *records)
            pipe.ltrim(key, -keep, -1)
            pipe.expire(key, ttl_s)
        pipe.execute()

    @_guard
    def spans(self, trace_id: str) -> list[str]:
        return list(self.redis.lrange(self.keys.trace(trace_id), 0, -1))

    @_guard
    def server_time(self) -> float:
        """Redis's clock, in seconds (for the doctor's skew check)."""
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / 1e6

    def close(self) -> None:
        self.redis.close()


def _capped(block_ms: int | None) -> int | None:
    """A blocking read's wait, kept well inside the socket's timeout (callers loop)."""
    return None if block_ms is None else min(block_ms, MAX_BLOCK_MS)


def _pairs(fields: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, separators=(",", ":"))
        yield name, str(value)


def _flatten(fields: Mapping[str, Any]) -> list[str]:
    return [item for pair in _pairs(fields) for item in pair]


def _event(entry_id: str, data: Mapping[str, str]) -> Event:
    previous = data.get("from")
    return Event(
        id=entry_id,
        task_id=data["task"],
        state=TaskState(data["state"]),
        reason=data.get("reason", ""),
        at=float(data["at"]),
        previous=TaskState(previous) if previous else None,
    )
