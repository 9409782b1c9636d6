"""The public Python API for upstream systems, and what the CLI calls.

from orchestrator import client
task_id = client.submit({"agent": "demo", "command": ["python3", "-c", "print(1)"]})
result = client.wait(task_id)          # the status dict once the task has ended
"""

from __future__ import annotations

import base64
import getpass
import json
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from orchestrator import config, wiring
from orchestrator.adapters.store import Store
from orchestrator.config import Settings
from orchestrator.core.lifecycle import TERMINAL, Event, TaskState, advance
from orchestrator.errors import IllegalTransition, TaskNotFound

if TYPE_CHECKING:
    from celery import Celery

    from orchestrator.core.spec import TaskSpec
    from orchestrator.remote import RemoteClient
    from orchestrator.submission import Submitter

_TIMES = ("created_at", "started_at", "finished_at", "updated_at")
_INTS = ("exit_code", "timeout_s", "logs_bytes", "logs_dropped_bytes", "revocation_pending")
_JSON = ("output", "spec", "grant", "revocation", "front_door")


def _iso(value: str | None) -> str | None:
    if not value:
        return None
    return datetime.fromtimestamp(float(value), UTC).isoformat(timespec="milliseconds")


def present(record: Mapping[str, str]) -> dict[str, Any]:
    """A task record as the JSON that `airlock status --json` prints."""
    out: dict[str, Any] = {
        "id": record["id"],
        "state": record["state"],
        "reason": record.get("reason", ""),
        "exit_code": None,
        "agent": record.get("agent"),
    }
    for name in _TIMES:
        out[name] = _iso(record.get(name))
    for name in _INTS:
        if record.get(name) not in (None, ""):
            out[name] = int(record[name])
    for name in _JSON:
        if record.get(name):
            out[name] = json.loads(record[name])
    for name in (
        "submitter",
        "on_behalf_of",
        "queue",
        "container_id",
        "cancel_requested_by",
        "output_error",
        "cleanup_error",
        "grant_hash",
        "policy_version",
        "jwt_jti",
        "worker",
        "warm_runner",
    ):
        if record.get(name):
            out[name] = record[name]
    if "oom_killed" in record:
        out["oom_killed"] = record["oom_killed"] == "1"
    return out


class Client:
    """Submits, reads and cancels tasks. It loads only what submitting needs: no Vault,
    Rego, Docker or gateway code (a test guards the list)."""

    def __init__(self, settings: Settings | None = None, store: Store | None = None) -> None:
        self.settings = settings or config.load()
        self.store = store or wiring.store(self.settings)

    @cached_property
    def _submitter(self) -> Submitter:
        # Lazy on purpose: reading a task loads no spec model, broker client or registry.
        from orchestrator.submission import Submitter

        return Submitter(self.settings, self.store)

    @property
    def _celery(self) -> Celery:
        return self._submitter.celery

    def submit(self, spec: TaskSpec | Mapping[str, Any]) -> str:
        """Validate, record and enqueue a task; returns its id.

        Raises InvalidSpec (nothing recorded) or ServiceUnavailable (nothing left pending).
        """
        return self._submitter.submit(spec)

    def route(self, task: TaskSpec) -> str:
        """The queue a task goes to (see Submitter.route)."""
        return self._submitter.route(task)

    def status(self, task_id: str) -> dict[str, Any]:
        """Raises TaskNotFound."""
        return present(self.store.get(task_id))

    def wait(
        self,
        task_id: str,
        timeout_s: float | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the task ends (or `timeout_s` passes); returns its status.

        With `on_event`, follows the task's event stream and passes on every state change;
        without, sleeps until the task has ended (one wake-up, not one per state).
        """
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        after = "0"
        ended = self._ended(task_id)
        while True:
            block = 1000 if give_up is None else int(max(give_up - time.monotonic(), 0) * 1000)
            if ended or (give_up is not None and block <= 0):
                return self.status(task_id)
            if on_event is None:
                # A task ended by a worker that does not mark the end is found by its record.
                ended = self.store.wait_ended(task_id, max(block, 1)) or self._ended(task_id)
                continue
            # The record is read again only once an event says the task ended: the event is
            # written with the end state and its fields, in one step.
            for event in self.store.events(task_id, after, block_ms=max(block, 1)):
                after = event.id
                ended = ended or event.state in TERMINAL
                on_event(event)

    def _ended(self, task_id: str) -> bool:
        """Whether the task's record says it has ended. Raises TaskNotFound."""
        return TaskState(self.store.get(task_id)["state"]) in TERMINAL

    def wait_admission(self, task_id: str, timeout_s: float) -> dict[str, Any]:
        """Wait until a worker has decided the task (or `timeout_s` passes); its status."""
        give_up = time.monotonic() + timeout_s
        after = "0"
        while True:
            record = self.store.get(task_id)
            left = give_up - time.monotonic()
            if record["state"] != TaskState.PENDING.value or left <= 0:
                return present(record)
            for event in self.store.events(task_id, after, block_ms=max(int(left * 1000), 1)):
                after = event.id

    def logs(self, task_id: str, follow: bool = False) -> Iterator[tuple[str, str]]:
        """(stream, text) chunks; with `follow`, until the task has ended and its output drained."""
        self.store.get(task_id)
        after = "0"
        while True:
            ended = self._ended(task_id)
            chunks = self.store.logs(task_id, after, block_ms=None if ended or not follow else 500)
            for after, stream, text in chunks:
                yield stream, text
            if not chunks and (ended or not follow):
                return

    def cancel(self, task_id: str, by: str | None = None) -> str:
        """Ask for the task to end; returns what happened, in words.

        A pending task is cancelled at once; a running one is signalled and its worker
        stops the container. Raises TaskNotFound.
        """
        by = by or getpass.getuser()
        try:
            advance(
                self.store,
                task_id,
                TaskState.CANCELLED,
                f"cancelled by {by} before it started",
                cancel_requested_by=by,
            )
            return "cancelled before it started"
        except IllegalTransition as exc:
            if exc.current and TaskState(exc.current) in TERMINAL:
                return f"already ended: {exc.current}"
        self.store.request_cancel(task_id, by)
        return "cancel requested"

    def tasks(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        records = self.store.recent(limit if state is None else max(limit * 10, 1000))
        shown = [present(r) for r in records if state is None or r["state"] == state]
        return shown[:limit]

    def runners(self, limit: int = 30) -> list[dict[str, Any]]:
        """The live view: recent tasks, live ones first, with their egress counts."""
        tasks = self.tasks(limit=limit)
        counts = self.store.egress_counts([task["id"] for task in tasks])
        for task, count in zip(tasks, counts, strict=True):
            task["egress_allowed"] = count.get("allow", 0)
            task["egress_denied"] = count.get("deny", 0)
        live = [t for t in tasks if TaskState(t["state"]) not in TERMINAL]
        return live + [t for t in tasks if TaskState(t["state"]) in TERMINAL]

    def trace(self, task_id: str) -> list[dict[str, Any]]:
        """The spans of the task's trace from the embedded store, in start order."""
        trace_id = self.store.get(task_id).get("trace_id")
        if not trace_id:
            return []
        # Lazy on purpose: only this read needs the tracer, to store this process's spans first.
        from orchestrator.adapters import telemetry

        telemetry.flush()
        spans = [json.loads(span) for span in self.store.spans(trace_id)]
        return sorted(spans, key=lambda span: span["start"] or 0)

    def output(self, task_id: str) -> list[tuple[str, bytes]]:
        """The files the task left in /workspace/output, as (name, content)."""
        files = self.status(task_id).get("output") or []
        return [(f["name"], base64.b64decode(f["data"])) for f in files]

    def close(self) -> None:
        self.store.close()


_default: Client | RemoteClient | None = None


def _client() -> Client | RemoteClient:
    """The API when AIRLOCK_API_URL is set (with AIRLOCK_TOKEN or the stored login), else
    direct access (the operator's mode on a worker host)."""
    global _default
    if _default is None:
        settings = config.load()
        if settings.api_url:
            from orchestrator.remote import RemoteClient  # lazy on purpose: HTTP mode only

            _default = RemoteClient(settings.api_url)
        else:
            _default = Client(settings)
    return _default


def submit(spec: TaskSpec | Mapping[str, Any]) -> str:
    """Submit a task with the settings of the environment; returns its id."""
    return _client().submit(spec)


def wait(task_id: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Wait for a task to end; returns its status (see `present`)."""
    return _client().wait(task_id, timeout_s)


__all__ = ["Client", "TaskNotFound", "present", "submit", "wait"]
