"""The submitting side: validate, record, sign, route and enqueue a task.

Used by the front door (`airlock serve`) for verified callers, and by the Python client
in direct mode, where the submitter is the local operator (the kernel vouches for the uid,
and holding the ticket key is the right to enqueue). Loaded on the first submit only.
"""

from __future__ import annotations

import os
import pwd
import socket
import uuid
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from celery import Celery

from orchestrator.adapters import telemetry
from orchestrator.adapters.queue import celery_app, enqueue
from orchestrator.adapters.store import Store
from orchestrator.adapters.ticket import TicketSigner
from orchestrator.config import Settings, gvisor_queue
from orchestrator.core.caller import Identities, Principal
from orchestrator.core.lifecycle import TaskState, advance
from orchestrator.core.spec import TaskSpec, parse, record_fields
from orchestrator.errors import AirlockError, ServiceUnavailable
from orchestrator.policy.agents import load_agent


def local_operator() -> Principal:
    """The account this process runs as, on this host."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid-{uid}"
    return Principal(name, "operator", f"local:{socket.gethostname()}", str(uid))


class Submitter:
    def __init__(
        self, settings: Settings, store: Store, signer: TicketSigner | None = None
    ) -> None:
        """Raises ConfigError when no ticket signing key can be read."""
        self.settings, self.store = settings, store
        self.signer = signer or TicketSigner(settings.ticket_key)
        telemetry.setup(settings, "client", store)
        # Agent name -> ((mtime, size) of its registry file, isolation class), for routing.
        self._isolation: dict[str, tuple[tuple[int, int], str]] = {}

    @cached_property
    def celery(self) -> Celery:
        return celery_app(self.settings)

    def submit(
        self,
        spec: TaskSpec | Mapping[str, Any],
        identities: Identities | None = None,
        fields: Mapping[str, Any] | None = None,
        task_id: str | None = None,
    ) -> str:
        """Record, sign and enqueue a task for `identities` (the local operator, acting for
        the spec's user, when not given); `fields` go on its record. Raises InvalidSpec
        (nothing recorded) or ServiceUnavailable (nothing left pending)."""
        task = parse(spec)
        if identities is None:
            identities = Identities(local_operator(), task.on_behalf_of)
        elif task.on_behalf_of != identities.user:
            task = task.model_copy(update={"on_behalf_of": identities.user})
        task_id = task_id or str(uuid.uuid4())
        attributes = {
            "airlock.task_id": task_id,
            "airlock.agent": task.agent,
            "airlock.submitter": identities.submitter.label,
        }
        if identities.user:
            attributes["airlock.on_behalf_of"] = identities.user
        with telemetry.tracer().start_as_current_span("submit", attributes=attributes):
            self._enqueue(task_id, task, identities, dict(fields or {}), telemetry.inject())
        return task_id

    def _enqueue(
        self,
        task_id: str,
        task: TaskSpec,
        identities: Identities,
        fields: dict[str, Any],
        traceparent: str | None,
    ) -> None:
        spec = task.model_dump(mode="json", exclude_none=True)
        queue = self.route(task)
        ticket = self.signer.sign(task_id, spec, queue, identities)
        self.store.create(task_id, record_fields(task) | identities.record_fields() | fields)
        try:
            enqueue(self.celery, task_id, spec, traceparent, queue, ticket)
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
