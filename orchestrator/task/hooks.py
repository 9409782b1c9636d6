"""Cross-cutting concerns of a task's life, hung on its phases instead of written into them.

The executor runs every phase of a task (task, admit, provision, launch, run, collect,
teardown) inside `Hooks.phase`, and writes what it learned there into the phase's `facts`.
Each hook sees every phase begin and end: tracing makes a span of it, metrics count and
time it. A hook never changes what happens to the task, and a failing hook never fails it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.trace import SpanKind, Status, StatusCode

from orchestrator.adapters import telemetry

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """One phase of one task. `facts` are written by the executor, read by the hooks."""

    name: str
    task_id: str
    facts: dict[str, Any] = field(default_factory=dict)
    # The reason the phase (for "task": the whole task) did not end well, if it did not.
    failure: str | None = None
    # For "task": the submitter's trace context, which the task's trace continues.
    traceparent: str | None = None


class TaskHook(Protocol):
    def phase(self, phase: Phase) -> contextlib.AbstractContextManager[None]:
        """Around one phase: what comes before the executor's work, and after it."""


class Hooks:
    """The hooks of an executor, composed in order (the first one wraps the others)."""

    def __init__(self, hooks: Sequence[TaskHook]) -> None:
        self.hooks = tuple(hooks)

    def phase(
        self, name: str, task_id: str, **facts: Any
    ) -> contextlib.AbstractContextManager[Phase]:
        return self._around(Phase(name, task_id, dict(facts)))

    def task(
        self, task_id: str, traceparent: str | None
    ) -> contextlib.AbstractContextManager[Phase]:
        """The whole life of one task: every other phase happens inside it."""
        return self._around(Phase("task", task_id, {"task_id": task_id}, traceparent=traceparent))

    @contextlib.contextmanager
    def _around(self, phase: Phase) -> Iterator[Phase]:
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.phase(phase))
            yield phase


# Facts the OpenTelemetry semantic conventions name go out under that name; the ones that
# are ours alone as `airlock.<name>`.
SEMANTIC = {
    "container_id": "container.id",
    "image": "container.image.name",
    "runtime": "container.runtime.name",
    "exit_code": "process.exit.code",
}


def _attributes(facts: dict[str, Any]) -> dict[str, Any]:
    return {
        SEMANTIC.get(name, f"airlock.{name}"): value
        for name, value in facts.items()
        if isinstance(value, (str, bool, int, float)) and value != ""
    }


class TracingHook:
    """Each phase is a span; the task phase is the root of the task's trace, continuing
    the submitter's. A phase's facts become its span's attributes when it ends."""

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        # The task span consumes the queue's message: the consumer of the submit's producer.
        task = phase.name == "task"
        context = telemetry.extract(phase.traceparent) if task else None
        kind = SpanKind.CONSUMER if task else SpanKind.INTERNAL
        with telemetry.tracer().start_as_current_span(phase.name, context, kind) as span:
            try:
                yield
            finally:
                span.set_attributes(_attributes(phase.facts))
                if phase.failure is not None:
                    span.set_status(Status(StatusCode.ERROR, phase.failure))
                    span.set_attribute(
                        "error.type", str(phase.facts.get("terminal_state") or "failed")
                    )


class MetricsHook:
    """Tasks by terminal state and their duration (from the worker taking the message to
    teardown), commands running, start latency, unverified revocations."""

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        meters = telemetry.meters()
        began = time.monotonic()
        if phase.name == "run":
            meters.running.add(1)
            meters.start_latency.record(
                float(phase.facts.get("start_latency_s", 0.0)),
                {"container.runtime.name": str(phase.facts.get("runtime", ""))},
            )
        try:
            yield
        finally:
            if phase.name == "run":
                meters.running.add(-1)
            elif phase.name == "teardown" and not phase.facts.get("revocation_verified"):
                meters.revocation_failures.add(1)
            elif phase.name == "task" and "terminal_state" in phase.facts:
                labels = {
                    "airlock.state": str(phase.facts["terminal_state"]),
                    "airlock.agent": str(phase.facts.get("agent", "")),
                }
                meters.tasks.add(1, labels)
                meters.duration.record(time.monotonic() - began, labels)


def default_hooks() -> Hooks:
    return Hooks([TracingHook(), MetricsHook()])
