"""The admit phase: validate the task, decide it by policy, and record the decision.

Also where a redelivered task of a lost worker is recognised and its teardown finished,
so that one message can never start a second container for the same task.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters.runtime.base import Runtime
from orchestrator.adapters.store import Store
from orchestrator.config import Settings, callers_file
from orchestrator.core.caller import Identities
from orchestrator.core.grant import Grant
from orchestrator.core.lifecycle import TERMINAL, TaskState, advance, try_advance
from orchestrator.core.spec import TaskSpec, parse, record_fields
from orchestrator.errors import (
    AirlockError,
    IllegalTransition,
    InvalidSpec,
    PolicyError,
    TaskNotFound,
)
from orchestrator.policy.bundle import Deployment
from orchestrator.policy.engine import PolicyEngine

S = TaskState


@dataclass(frozen=True)
class Admitted:
    """A task the policy let in, with what it was granted."""

    spec: TaskSpec
    grant: Grant
    policy_version: str


@dataclass(frozen=True)
class Verdict:
    """What admission decided: the state the task moves to, why, and what goes with it."""

    state: TaskState
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)
    admitted: Admitted | None = None


def heartbeat(store: Store, settings: Settings, task_id: str) -> None:
    """This worker still owns the task (three missed beats and the reaper takes over). The
    first beat is written with the admission itself."""
    store.heartbeat(task_id, settings.heartbeat_s * 3)


class Admission:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: Runtime,
        policy: PolicyEngine | None,
        remove: Callable[[str, str | None], None],
    ) -> None:
        self.settings, self.store, self.runtime = settings, store, runtime
        self.policy = policy or PolicyEngine(
            settings.policy_dir, settings.agents_dir, self.deployment, callers_file(settings)
        )
        self._remove = remove
        self._runtimes: tuple[str, ...] | None = None
        self.worker_name = socket.gethostname()

    def deployment(self) -> Deployment:
        """What the policy needs to know about this worker host."""
        if self._runtimes is None:
            self._runtimes = tuple(sorted(self.runtime.runtimes()))
        return Deployment.of(self.settings, self._runtimes)

    def admit(
        self,
        task_id: str,
        spec_data: object,
        fields: Mapping[str, Any] | None = None,
        identities: Identities | None = None,
    ) -> Admitted | None:
        """Validate the task, decide it by policy, and record the decision in one step (the
        record is made here if the front door's record has expired or was never written).
        `fields` go on the record with the decision (the trace id); so do `identities`, the
        submitter and user the task's admission ticket vouched for.

        Returns None when the task must not run here: rejected, already taken, or ended. A
        redelivered task that a lost worker had started is recovered instead.
        """
        extra = dict(fields or {}) | (identities.record_fields() if identities else {})
        try:
            spec = parse(spec_data)
        except InvalidSpec as exc:
            agent = spec_data.get("agent") if isinstance(spec_data, Mapping) else None
            self.store.create(task_id, {"agent": agent if isinstance(agent, str) else "?"})
            self._try_advance(task_id, S.REJECTED, "; ".join(exc.problems), **extra)
            return None
        if identities is not None and spec.on_behalf_of != identities.user:
            verdict = Verdict(S.REJECTED, "on_behalf_of is not the user the ticket proves")
        else:
            verdict = self._decide(spec)
        try:
            self._record(task_id, spec, verdict, extra)
        except IllegalTransition as exc:  # decided before: a redelivery, or it ended
            state = TaskState(exc.current)
            if state not in TERMINAL:
                self._recover(task_id, state)
            return None
        return verdict.admitted

    def _record(
        self, task_id: str, spec: TaskSpec, verdict: Verdict, extra: dict[str, Any]
    ) -> None:
        """Move the pending task to the verdict's state. Raises IllegalTransition when the
        task is not pending any more."""
        fields = extra | verdict.fields
        # Admitted: this worker's first heartbeat is written in the same step.
        owner_s = self.settings.heartbeat_s * 3 if verdict.admitted else 0
        try:
            advance(self.store, task_id, verdict.state, verdict.reason, owner_s, **fields)
        except TaskNotFound:  # enqueued by a raw producer: no client recorded it
            self.store.record(task_id, record_fields(spec))
            advance(self.store, task_id, verdict.state, verdict.reason, owner_s, **fields)

    def _decide(self, spec: TaskSpec) -> Verdict:
        """The policy's decision, as the state the task moves to (fail closed: no policy,
        no task)."""
        try:
            decision = self.policy.admit(spec)
        except PolicyError as exc:
            return Verdict(S.REJECTED, "; ".join(exc.problems))
        except AirlockError as exc:
            return Verdict(S.FAILED, f"error: {exc}")
        if decision.grant is None:
            return Verdict(
                S.REJECTED,
                "; ".join(decision.reasons),
                {"policy_version": decision.policy_version},
            )
        grant = decision.grant
        fields = {
            "grant": grant.canonical_json(),
            "grant_hash": grant.digest(),
            "policy_version": decision.policy_version,
            "worker": self.worker_name,
        }
        admitted = Admitted(spec, grant, decision.policy_version)
        return Verdict(S.ADMITTED, "admitted by policy", fields, admitted)

    def _recover(self, task_id: str, state: TaskState) -> None:
        """A redelivered task that a lost worker had started: finish its teardown.

        A worker that still heartbeats for it is not lost (the broker delivered the message
        twice): it finishes the task itself, and this delivery does nothing.
        """
        if self.store.has_owner(task_id):
            return
        if state is not S.TEARING_DOWN:
            reason = f"worker lost while {state}"
            self._try_advance(task_id, S.TEARING_DOWN, reason, outcome=S.FAILED.value)
        record = self.store.get(task_id)
        self._remove(task_id, record.get("container_id"))
        outcome = TaskState(record.get("outcome") or S.FAILED.value)
        self._try_advance(task_id, outcome, record.get("reason", "worker lost"))

    def _try_advance(self, task_id: str, target: TaskState, reason: str, **fields: Any) -> bool:
        return try_advance(self.store, task_id, target, reason, **fields)
