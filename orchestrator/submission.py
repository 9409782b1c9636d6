"""The submitting side of the client: validate, record, route and enqueue a task.

Loaded on the first submit only (`Client.submit`): reading a task needs none of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from celery import Celery

from orchestrator.adapters import telemetry
from orchestrator.adapters.queue import celery_app, enqueue
from orchestrator.adapters.store import Store
from orchestrator.config import Settings, gvisor_queue
from orchestrator.core.lifecycle import TaskState, advance
from orchestrator.core.spec import TaskSpec, parse, record_fields
from orchestrator.errors import AirlockError, ServiceUnavailable
from orchestrator.policy.agents import load_agent


class Submitter:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        telemetry.setup(settings, "client", store)
        # Agent name -> ((mtime, size) of its registry file, isolation class), for routing.
        self._isolation: dict[str, tuple[tuple[int, int], str]] = {}

    @cached_property
    def celery(self) -> Celery:
        return celery_app(self.settings)

    def submit(self, spec: TaskSpec | Mapping[str, Any]) -> str:
        """Raises InvalidSpec (nothing recorded) or ServiceUnavailable (nothing left pending)."""
        task = parse(spec)
        task_id = str(uuid.uuid4())
        with telemetry.tracer().start_as_current_span(
            "submit", attributes={"airlock.task_id": task_id, "airlock.agent": task.agent}
        ):
            self._enqueue(task_id, task, telemetry.inject())
        return task_id

    def _enqueue(self, task_id: str, task: TaskSpec, traceparent: str | None) -> None:
        self.store.create(task_id, record_fields(task))
        spec = task.model_dump(mode="json", exclude_none=True)
        try:
            enqueue(self.celery, task_id, spec, traceparent, self.route(task))
        except ServiceUnavailable as exc:
            self._abandon(task_id, f"could not enqueue: {exc.__cause__ or exc}")
            raise

    def route(self, task: TaskSpec) -> str:
        """The queue a task goes to: its own `queue`, else by its agent's isolation class.

        gVisor agents go to `<queue>-gvisor`, served only by hosts that have runsc. Where the
        registry is not readable here, the default queue (admission still decides).
        """
        if task.queue:
            return task.queue
        path = self.settings.agents_dir / f"{task.agent}.yaml"
        try:
            info = path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
            known = self._isolation.get(task.agent)
            if known is None or known[0] != stamp:  # parsing YAML costs more than the submit
                known = self._isolation[task.agent] = (stamp, load_agent(path).isolation)
        except (OSError, AirlockError):
            return self.settings.queue
        return gvisor_queue(self.settings) if known[1] == "gvisor" else self.settings.queue

    def _abandon(self, task_id: str, reason: str) -> None:
        try:
            advance(self.store, task_id, TaskState.FAILED, reason)
        except Exception:  # the store may be what failed; the record then expires unqueued
            pass
