"""The submitting side: validate, record, sign, route and enqueue a task.

Used by the front door (`airlock serve`) for verified callers, and by the Python client
in direct mode, where the submitter is the local operator (the kernel vouches for the uid,
and holding the ticket key is the right to enqueue). Loaded on the first submit only.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from celery import Celery
from opentelemetry import trace

from orchestrator.adapters import telemetry
from orchestrator.adapters.queue import celery_app, enqueue, redis_message
from orchestrator.adapters.store import Made, NewTask, Once, Quota, Store
from orchestrator.adapters.ticket import TicketSigner
from orchestrator.config import Settings, gvisor_queue
from orchestrator.core.caller import Identities, Principal
from orchestrator.core.lifecycle import TaskState, advance
from orchestrator.core.spec import TaskSpec, parse, record_fields
from orchestrator.errors import AirlockError, ServiceUnavailable
from orchestrator.policy.agents import load_agent


@dataclass(frozen=True)
class _Plan:
    """A task ready to record and queue, but for its trace context (known inside the
    submit span only)."""

    new: NewTask
    body: dict[str, Any]
    queue: str
    ticket: str
    identities: Identities
    on_redis: bool

    @property
    def attributes(self) -> dict[str, str]:
        attributes = {
            "airlock.task_id": self.new.task_id,
            "airlock.agent": str(self.body["agent"]),
            "airlock.submitter": self.identities.submitter.label,
        }
        if self.identities.user:
            attributes["airlock.on_behalf_of"] = self.identities.user
        return attributes

    @property
    def messaging(self) -> dict[str, str]:
        """The message's attributes in OpenTelemetry's messaging conventions."""
        return {
            "messaging.system": "redis" if self.on_redis else "celery",
            "messaging.operation.type": "send",
            "messaging.destination.name": self.queue,
            "messaging.message.id": self.new.task_id,
        }

    def finish(
        self, traceparent: str | None
    ) -> tuple[NewTask, tuple[dict[str, Any], str, str, str | None] | None]:
        """The task to record, and what Celery is to send once it is recorded (None: on a
        Redis broker the message goes onto its queue in the same step as the record)."""
        if self.on_redis:
            message = redis_message(
                self.new.task_id, self.body, traceparent, self.queue, self.ticket
            )
            return replace(self.new, message=(self.queue, message)), None
        return self.new, (self.body, self.queue, self.ticket, traceparent)


# The HTTP request a submit span serves (OpenTelemetry's HTTP server conventions), and the
# status each outcome answers with.
SUBMIT_REQUEST = {"http.request.method": "POST", "http.route": "/v1/tasks", "url.path": "/v1/tasks"}
_STATUS = {"new": 201, "again": 200, "quota": 403, "exists": 409}


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
    ) -> str:
        """Record, sign and enqueue a task for `identities` (the local operator, acting for
        the spec's user, when not given); `fields` go on its record; its id. Raises
        InvalidSpec (nothing recorded) or ServiceUnavailable (nothing left pending)."""
        return self.send(spec, identities, fields).detail[0]

    def send(
        self,
        spec: TaskSpec | Mapping[str, Any],
        identities: Identities | None = None,
        fields: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        quota: Quota | None = None,
        once: Once | None = None,
        decision: str | None = None,
    ) -> Made:
        """`submit`, with the front door's `quota`, `once` and `decision` (see NewTask).
        The outcome names the task ("new": detail[0] is this one; "again": the
        Idempotency-Key's first) or says why nothing was queued ("quota")."""
        plan = self._plan(spec, identities, fields, task_id, quota, once, decision)
        attributes = {**plan.attributes, **plan.messaging}
        with telemetry.tracer().start_as_current_span(
            "submit", kind=trace.SpanKind.PRODUCER, attributes=attributes
        ):
            new, sent = plan.finish(telemetry.inject())
            made = self.store.submit(new)
            if made.outcome == "new" and sent is not None:
                self._send(new, sent)
        return made if made.outcome != "new" else replace(made, detail=(new.task_id,))

    async def send_async(
        self,
        spec: TaskSpec,
        identities: Identities,
        quota: Quota,
        once: Once | None,
        decision: str,
        traceparent: str | None = None,
    ) -> Made:
        """`send` for the API's event loop: the record (and, on a Redis broker, the
        message) in one call that does not block it. Its span is the server span of the
        submit request, in the caller's trace when it sent a `traceparent`."""
        plan = self._plan(spec, identities, None, None, quota, once, decision)
        attributes = {**plan.attributes, **SUBMIT_REQUEST}
        tracer = telemetry.tracer()
        with tracer.start_as_current_span(
            "submit", telemetry.extract(traceparent), trace.SpanKind.SERVER, attributes
        ) as span:
            # The message is sent from a producer span: the worker's consumer span follows it.
            with tracer.start_as_current_span(
                f"publish {plan.queue}", kind=trace.SpanKind.PRODUCER, attributes=plan.messaging
            ):
                new, sent = plan.finish(telemetry.inject())
                made = await self.store.submit_async(new)
                if made.outcome == "new" and sent is not None:
                    await asyncio.to_thread(self._send, new, sent)
            span.set_attribute("http.response.status_code", _STATUS[made.outcome])
        return made if made.outcome != "new" else replace(made, detail=(new.task_id,))

    def _plan(
        self,
        spec: TaskSpec | Mapping[str, Any],
        identities: Identities | None,
        fields: Mapping[str, Any] | None,
        task_id: str | None,
        quota: Quota | None,
        once: Once | None,
        decision: str | None,
    ) -> _Plan:
        task = parse(spec)
        if identities is None:
            identities = Identities(local_operator(), task.on_behalf_of)
        elif task.on_behalf_of != identities.user:
            task = task.model_copy(update={"on_behalf_of": identities.user})
        task_id = task_id or str(uuid.uuid4())
        body = task.model_dump(mode="json", exclude_none=True)
        queue = self.route(task)
        new = NewTask(
            task_id,
            record_fields(task) | identities.record_fields() | dict(fields or {}),
            quota,
            once,
            None,
            decision,
        )
        ticket = self.signer.sign(task_id, body, queue, identities)
        return _Plan(new, body, queue, ticket, identities, self.on_redis)

    def _send(self, new: NewTask, sent: tuple[dict[str, Any], str, str, str | None]) -> None:
        """Send a recorded task through Celery (a broker other than the store's Redis)."""
        body, queue, ticket, traceparent = sent
        try:
            enqueue(self.celery, new.task_id, body, traceparent, queue, ticket)
        except ServiceUnavailable as exc:
            self._abandon(new.task_id, f"could not enqueue: {exc.__cause__ or exc}", new.once)
            raise

    @cached_property
    def on_redis(self) -> bool:
        """Whether the broker is the store's own Redis (the queue is a list beside it)."""
        return self.settings.broker_url in (None, "", self.settings.redis_url)

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

    def _abandon(self, task_id: str, reason: str, once: Once | None) -> None:
        """A recorded task that could not be queued fails (which frees its quota), and its
        Idempotency-Key is let go: a retry makes a new task."""
        try:
            advance(self.store, task_id, TaskState.FAILED, reason)
            if once is not None:
                self.store.forget_idempotent(once.key)
        except Exception:  # the store may be what failed; the record then expires unqueued
            pass
