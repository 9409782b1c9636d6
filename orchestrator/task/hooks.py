"""Cross-cutting concerns of a task's life, hung on its phases instead of written into them.

The executor runs every phase of a task (task, admit, provision, launch, run, collect,
teardown) inside `Hooks.phase`, and writes what it learned there into the phase's `facts`.
Each hook sees every phase begin and end: tracing makes a span of it, metrics count and
time it. A hook never changes what happens to the task, and a failing hook never fails it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.trace import Status, StatusCode

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


# Facts that are ours alone go out as `airlock.<name>`.
def _attributes(facts: dict[str, Any]) -> dict[str, Any]:
    return {
        f"airlock.{name}": value
        for name, value in facts.items()
        if isinstance(value, (str, bool, int, float))
    }


class TracingHook:
    """Each phase is a span; the task phase is the root of the task's trace, continuing
    the submitter's. A phase's facts become its span's attributes when it ends."""

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        context = telemetry.extract(phase.traceparent) if phase.name == "task" else None
        with telemetry.tracer().start_as_current_span(phase.name, context=context) as span:
            try:
                yield
            finally:
                span.set_attributes(_attributes(phase.facts))
                if phase.failure is not None:
                    span.set_status(Status(StatusCode.ERROR, phase.failure))


class MetricsHook:
    """Tasks by terminal state, commands running, start latency, unverified revocations."""

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        meters = telemetry.meters()
        if phase.name == "run":
            meters.running.add(1)
            meters.start_latency.record(
                float(phase.facts.get("start_latency_s", 0.0)),
                {"runtime": str(phase.facts.get("runtime", ""))},
            )
        try:
            yield
        finally:
            if phase.name == "run":
                meters.running.add(-1)
            elif phase.name == "teardown" and not phase.facts.get("revocation_verified"):
                meters.revocation_failures.add(1)
            elif phase.name == "task" and "terminal_state" in phase.facts:
                meters.tasks.add(
                    1,
                    {
                        "state": str(phase.facts["terminal_state"]),
                        "agent": str(phase.facts.get("agent", "")),
                    },
                )


def default_hooks() -> Hooks:
    return Hooks([TracingHook(), MetricsHook()])
