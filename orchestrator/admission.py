"""The admit phase: record the task, validate its spec, and decide it by policy.

Also where a redelivered task of a lost worker is recognised and its teardown finished,
so that one message can never start a second container for the same task.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.config import Settings
from orchestrator.errors import AirlockError, InvalidSpec, PolicyError
from orchestrator.lifecycle import TERMINAL, TaskState, try_advance
from orchestrator.policy.engine import Decision, Deployment, PolicyEngine
from orchestrator.policy.grant import Grant
from orchestrator.runtime.base import Runtime
from orchestrator.spec import TaskSpec, parse
from orchestrator.store import Store

S = TaskState


@dataclass(frozen=True)
class Admitted:
    """A task the policy let in, with what it was granted."""

    spec: TaskSpec
    grant: Grant
    policy_version: str


def record_fields(spec: TaskSpec) -> dict[str, Any]:
    """The fields a new task record starts with."""
    return {
        "agent": spec.agent,
        "spec": spec.to_json(),
        "queue": spec.queue,
        "on_behalf_of": spec.on_behalf_of,
        "timeout_s": spec.timeout_s,
    }


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
            settings.policy_dir, settings.agents_dir, self.deployment
        )
        self._remove = remove
        self._runtimes: tuple[str, ...] | None = None
        self.worker_name = socket.gethostname()

    def deployment(self) -> Deployment:
        """What the policy needs to know about this worker host."""
        if self._runtimes is None:
            self._runtimes = tuple(sorted(self.runtime.runtimes()))
        s = self.settings
        return Deployment(
            runner_image=s.runner_image,
            runtimes=self._runtimes,
            default_timeout_s=s.default_timeout_s,
            default_limits={
                "cpus": s.default_cpus,
                "memory": s.default_memory,
                "pids": s.default_pids,
            },
            max_timeout_s=s.max_timeout_s,
            trust_domain=s.trust_domain,
        )

    def admit(
        self, task_id: str, spec_data: object, fields: Mapping[str, Any] | None = None
    ) -> Admitted | None:
        """Record the task if a raw producer enqueued it, validate it, decide it by policy.
        `fields` go on the record with the decision (the trace id).

        Returns None when the task must not run here: rejected, already taken, or ended.
        """
        extra = dict(fields or {})
        try:
            spec = parse(spec_data)
        except InvalidSpec as exc:
            agent = spec_data.get("agent") if isinstance(spec_data, Mapping) else None
            self.store.create(task_id, {"agent": agent if isinstance(agent, str) else "?"})
            self._try_advance(task_id, S.REJECTED, "; ".join(exc.problems), **extra)
            return None
        state = self.store.record(task_id, record_fields(spec)) or S.PENDING
        if state is S.PENDING:
            decision = self._decide(task_id, spec, extra)
            if decision is None or decision.grant is None:
                return None
            grant = decision.grant
            extra |= {
                "grant": grant.canonical_json(),
                "grant_hash": grant.digest(),
                "policy_version": decision.policy_version,
                "worker": self.worker_name,
            }
            owner_s = self.settings.heartbeat_s * 3  # this worker's, in the same step
            if self._try_advance(task_id, S.ADMITTED, "admitted by policy", owner_s, **extra):
                return Admitted(spec, grant, decision.policy_version)
            state = TaskState(self.store.get(task_id)["state"])
        if state not in TERMINAL:
            self._recover(task_id, state)
        return None

    def _decide(self, task_id: str, spec: TaskSpec, extra: dict[str, Any]) -> Decision | None:
        """The policy's decision; a refusal (or no decision) is recorded on the task."""
        try:
            decision = self.policy.admit(spec)
        except PolicyError as exc:  # fail closed: no policy, no task
            self._try_advance(task_id, S.REJECTED, "; ".join(exc.problems), **extra)
            return None
        except AirlockError as exc:
            self._try_advance(task_id, S.FAILED, f"error: {exc}", **extra)
            return None
        if decision.grant is None:
            self._try_advance(
                task_id,
                S.REJECTED,
                "; ".join(decision.reasons),
                policy_version=decision.policy_version,
                **extra,
            )
        return decision

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

    def _try_advance(
        self, task_id: str, target: TaskState, reason: str, owner_s: float = 0, **fields: Any
    ) -> bool:
        return try_advance(self.store, task_id, target, reason, owner_s, **fields)
