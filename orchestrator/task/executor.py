"""Carries one task through its life: admit, provision, launch, run, collect, teardown.

Teardown always runs (finally): the container is removed whatever happened before, and
the task ends in a terminal state with a reason. Every state write goes through
lifecycle.advance, so a task that was cancelled or finished elsewhere is never overwritten.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters import logs, telemetry
from orchestrator.adapters.runtime.base import ContainerSpec, ExitStatus, Runtime
from orchestrator.adapters.store import Store
from orchestrator.config import TASK_USER, Settings
from orchestrator.core.caller import Identities
from orchestrator.core.grant import Grant
from orchestrator.core.ids import is_task_id
from orchestrator.core.lifecycle import SIGNAL_CANCEL, SIGNAL_EXIT, TaskState, advance, try_advance
from orchestrator.core.outcome import Ending, Facts, decide
from orchestrator.core.spec import TaskSpec
from orchestrator.errors import AirlockError, InvalidId
from orchestrator.policy.bundle import Deployment
from orchestrator.policy.engine import PolicyEngine
from orchestrator.task.admission import Admission, heartbeat
from orchestrator.task.collect import LogPump, OutputFile, ResultScanner
from orchestrator.task.credentials import Credentials, Handout
from orchestrator.task.hooks import Hooks, default_hooks
from orchestrator.task.pool import Member, WarmPool

log = logging.getLogger(__name__)
S = TaskState


@dataclass
class Outcome:
    """What the task ended as, decided during the run (core.outcome's rules) and written
    after teardown."""

    state: TaskState = S.FAILED
    reason: str = field(default_factory=lambda: decide(Ending.LOST)[1])
    fields: dict[str, Any] = field(default_factory=dict)

    def end(self, ending: Ending, facts: Facts | None = None) -> None:
        self.state, self.reason = decide(ending, facts or Facts())


@dataclass
class Run:
    """The moving parts of one task while it is on this worker."""

    task_id: str
    spec: TaskSpec
    grant: Grant
    deadline: float
    container_id: str | None = None
    handout: Handout | None = None
    marker: str = ""
    policy_version: str = ""
    submitter: str = ""
    ticket: str | None = None  # the front door's admission ticket: what lets Vault mint
    admitted_at: float = field(default_factory=time.time)
    pump: LogPump | None = None
    scanner: ResultScanner | None = None
    status: ExitStatus | None = None


class Executor:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: Runtime,
        credentials: Credentials,
        policy: PolicyEngine | None = None,
        clock: Callable[[], float] = time.time,
        pool: WarmPool | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.clock = clock
        self.admission = Admission(settings, store, runtime, policy, self._remove)
        self.credentials = credentials
        self.pool = pool
        self.hooks = hooks or default_hooks()
        self._pool = ThreadPoolExecutor(
            max_workers=2 * max(settings.worker_concurrency, 1), thread_name_prefix="provision"
        )
        self._in_flight: set[str] = set()  # the tasks this executor is running now
        self._in_flight_lock = threading.Lock()

    def stop_all(self, by: str) -> list[str]:
        """Cancel every task this executor is running, as `by` (a worker shutting down: its
        tasks end cancelled, their containers stopped and credentials revoked, before it
        exits). Returns their ids."""
        with self._in_flight_lock:
            running = sorted(self._in_flight)
        for task_id in running:
            self.store.request_cancel(task_id, by)
        return running

    @property
    def worker_name(self) -> str:
        """Which worker runs the task (recorded on it): its Celery node name."""
        return self.admission.worker_name

    @worker_name.setter
    def worker_name(self, name: str) -> None:
        self.admission.worker_name = name

    @property
    def policy(self) -> PolicyEngine:
        return self.admission.policy

    def deployment(self) -> Deployment:
        return self.admission.deployment()

    # -- entry point --------------------------------------------------------------------
    def execute(
        self,
        task_id: str,
        spec_data: object,
        traceparent: str | None = None,
        identities: Identities | None = None,
        ticket: str | None = None,
    ) -> TaskState:
        """Run one task to a terminal state and return it. Never leaves a container behind.

        The whole life is one trace: `traceparent` (from the submitter) is its parent.
        `identities` are the submitter and user its admission `ticket` vouched for (the
        ticket is presented again to Vault to mint the task's credentials). A message
        whose id is not a task id is refused unrecorded (its id would become keys, labels
        and paths).
        """
        if not is_task_id(task_id):
            log.error("message refused, nothing recorded: %s", InvalidId(task_id))
            return S.REJECTED
        logs.current_task.set(task_id)
        with self.hooks.task(task_id, traceparent) as task:
            if identities is not None:
                task.facts["submitter"] = identities.submitter.label
            state, summary = self._execute(task_id, spec_data, identities, ticket)
            task.facts.update(
                agent=summary.get("agent", ""),
                on_behalf_of=summary.get("on_behalf_of") or "",
                terminal_state=state.value,
                reason=summary.get("reason", ""),
            )
            if state is not S.SUCCEEDED:
                task.failure = summary.get("reason") or state.value
            return state

    def _execute(
        self,
        task_id: str,
        spec_data: object,
        identities: Identities | None,
        ticket: str | None,
    ) -> tuple[TaskState, dict[str, str]]:
        """The task's end state, and what its trace says of it (agent, owner, reason)."""
        with self.hooks.phase("admit", task_id) as phase:
            fields = {"trace_id": telemetry.current_trace_id()}
            admitted = self.admission.admit(task_id, spec_data, fields, identities)
            if admitted is None:
                record = self.store.get(task_id)
                phase.facts["decision"] = record["state"]
                return TaskState(record["state"]), record
            phase.facts.update(
                decision="admit",
                policy_version=admitted.policy_version,
                grant_hash=admitted.grant.digest(),
            )
        spec, grant = admitted.spec, admitted.grant
        run = Run(
            task_id,
            spec,
            grant,
            deadline=self.clock() + grant.timeout_s,
            policy_version=admitted.policy_version,
            submitter=identities.submitter.label if identities else "",
            ticket=ticket,
        )
        outcome = Outcome()
        with self._in_flight_lock:
            self._in_flight.add(task_id)
        try:
            if self._provision_and_launch(run, outcome):
                with self.hooks.phase(
                    "run",
                    task_id,
                    start_latency_s=self.clock() - run.admitted_at,
                    runtime=grant.runtime,
                ):
                    self.credentials.endpoints.trace(task_id, telemetry.inject())
                    self._wait(run, outcome)
        except AirlockError as exc:
            outcome.end(Ending.ERROR, Facts(error=str(exc)))
        except Exception as exc:
            log.exception("task %s: unexpected error", task_id)
            outcome.end(Ending.INTERNAL, Facts(error=repr(exc)))
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(task_id)
            with self.hooks.phase("teardown", task_id) as phase:
                self._teardown(run, outcome)
                receipt = outcome.fields.get("revocation") or {}
                phase.facts["revocation_verified"] = bool(receipt.get("verified"))
        summary = {"agent": spec.agent, "on_behalf_of": spec.on_behalf_of or ""}
        return outcome.state, {**summary, "reason": outcome.reason}

    # -- admit ---------------------------------------------------------------------------
    def _try_advance(self, task_id: str, target: TaskState, reason: str, **fields: Any) -> bool:
        return try_advance(self.store, task_id, target, reason, **fields)

    # -- provision and launch -----------------------------------------------------------
    def _task_env(self, run: Run, marker: str) -> dict[str, str]:
        env = {
            **run.spec.env,
            "AIRLOCK_TASK_ID": run.task_id,
            "AIRLOCK_AGENT": run.spec.agent,
            "AIRLOCK_RESULT_MARKER": marker,
            "AIRLOCK_OUTPUT_MAX_BYTES": str(self.settings.output_max_bytes),
        }
        traceparent = telemetry.inject()
        if traceparent:
            env["TRACEPARENT"] = traceparent
        return env

    def _container_spec(self, run: Run, marker: str, endpoint_dir: str | None) -> ContainerSpec:
        spec, grant = run.spec, run.grant
        return ContainerSpec(
            task_id=run.task_id,
            namespace=self.settings.namespace,
            image=grant.image,
            command=spec.command,
            env=self._task_env(run, marker),
            user=TASK_USER,
            cpus=grant.limits.cpus,
            memory=grant.limits.memory,
            pids=grant.limits.pids,
            deadline=run.deadline,
            agent=grant.agent,
            on_behalf_of=grant.on_behalf_of,
            runtime=None if grant.runtime == "runc" else grant.runtime,
            endpoint_dir=endpoint_dir,
            runner_dir=str(self.settings.runner_dir),
        )

    def _provision_and_launch(self, run: Run, outcome: Outcome) -> bool:
        """Create, attach and start the container; False if it was cancelled first."""
        member = self._claim(run)
        if member is not None:
            return self._warm_start(run, outcome, member)
        with self.hooks.phase(
            "provision", run.task_id, image=run.grant.image, runtime=run.grant.runtime
        ):
            self._provision(run)
        if self.store.take_signal(run.task_id) == SIGNAL_CANCEL:
            self._cancelled(run, outcome, started=False)
            return False
        with self.hooks.phase(
            "launch",
            run.task_id,
            container_id=run.container_id or "",
            image=run.grant.image,
            isolation=run.grant.runtime,
        ):
            self._launch(run)
        return True

    @staticmethod
    def _context(run: Run) -> dict[str, Any]:
        """What every audit record of the task carries."""
        return {
            "model": run.spec.model,
            "prompt_hash": run.spec.prompt_hash,
            "policy_version": run.policy_version,
            "submitter": run.submitter,
        }

    def _provision(self, run: Run) -> None:
        """Mint the credentials and create (not start) the container, at the same time."""
        advance(self.store, run.task_id, S.PROVISIONING, "minting credentials")
        context = self._context(run)
        # Vault and the engine work at the same time: the container is created (not started)
        # while the task's credentials are minted; its endpoint directory is known ahead.
        endpoint_dir = self.credentials.endpoints.directory(run.task_id)
        endpoint_dir.mkdir(parents=True, exist_ok=True)
        minting = self._pool.submit(
            contextvars.copy_context().run,  # the Vault calls' spans belong to this task's trace
            self.credentials.provision,
            run.task_id,
            run.grant,
            run.grant.digest(),
            run.deadline,
            context,
            ticket=run.ticket,
        )
        marker = secrets.token_hex(16)
        try:
            # Its id goes on the record with the next state (a lost worker's container is
            # found by its labels).
            run.container_id = self.runtime.create(
                self._container_spec(run, marker, str(endpoint_dir))
            )
        finally:
            try:
                run.handout = minting.result()
            except AirlockError:
                if run.container_id is not None:
                    raise
                # the engine's error is the one to report; teardown revokes what was minted
        # Only this container's processes may speak on the endpoint from now on.
        self.credentials.endpoints.bind(run.task_id, run.container_id)
        run.marker = marker

    def _claim(self, run: Run) -> Member | None:
        if self.pool is None:
            return None
        return self.pool.claim(run.grant.image, run.grant.runtime, run.grant.limits)

    def _warm_start(self, run: Run, outcome: Outcome, member: Member) -> bool:
        """A warm runner: bind it to the task, mint the credentials, hand it the command."""
        with self.hooks.phase(
            "provision",
            run.task_id,
            image=run.grant.image,
            runtime=run.grant.runtime,
            warm_runner=member.key,
        ):
            advance(self.store, run.task_id, S.PROVISIONING, "claimed a warm runner")
            run.container_id = member.container_id
            self.store.pool_claimed(member.key, run.task_id)
            self.store.update(
                run.task_id, {"container_id": member.container_id, "warm_runner": member.key}
            )
            if self.store.take_signal(run.task_id) == SIGNAL_CANCEL:
                self._cancelled(run, outcome, started=False)
                return False
            run.marker = secrets.token_hex(16)
            self._attach(run)  # before the runner learns its command: no output is missed
            launch = {"command": list(run.spec.command), "env": self._task_env(run, run.marker)}
            try:
                run.handout = self.credentials.provision(
                    run.task_id,
                    run.grant,
                    run.grant.digest(),
                    run.deadline,
                    self._context(run),
                    member=member.key,
                    launch=launch,
                    ticket=run.ticket,
                )
            except AirlockError:
                self.credentials.endpoints.close(member.key)  # never bound to the task
                raise
        self._running(run)
        return True

    def _attach(self, run: Run) -> None:
        assert run.container_id is not None
        # Enough room for the base64 of every output byte plus the frame's own JSON.
        run.scanner = ResultScanner(run.marker, self.settings.output_max_bytes * 2 + 65536)
        run.pump = LogPump(
            batches=self.runtime.attach(run.container_id),
            scanner=run.scanner,
            sink=lambda texts: self._append_logs(run.task_id, texts),
            on_end=lambda: self._container_exited(run),
            max_bytes=self.settings.log_max_bytes,
        )
        run.pump.start()

    def _launch(self, run: Run) -> None:
        """Attach to the container's output, then start it: the command runs."""
        assert run.container_id is not None
        self._attach(run)
        self.runtime.start(run.container_id)
        self._running(run)

    def _running(self, run: Run) -> None:
        advance(
            self.store,
            run.task_id,
            S.RUNNING,
            "command started",
            started_at=self.clock(),
            container_id=run.container_id,
        )

    def _append_logs(self, task_id: str, texts: list[tuple[str, str]]) -> None:
        for stream, text in texts:
            self.store.append_log(task_id, stream, text)

    def _container_exited(self, run: Run) -> None:
        """Runs on the pump's thread when the output stream ends: wake the task's waiter."""
        try:
            if run.container_id:
                run.status = self.runtime.wait(run.container_id)
        except AirlockError as exc:  # removed under us during an aborted launch
            log.info("task %s: no exit status: %s", run.task_id, exc)
        finally:
            self.store.signal(run.task_id, SIGNAL_EXIT)

    # -- run ------------------------------------------------------------------------------
    def _wait(self, run: Run, outcome: Outcome) -> None:
        """Wait for the exit, the deadline or a cancel, whichever comes first.

        Meanwhile the task's periodic Vault token is renewed, so that it dies soon after
        this worker does.
        """
        renew_every = self.settings.vault_token_period_s / 3
        next_renewal = self.clock() + renew_every
        next_beat = self.clock() + self.settings.heartbeat_s
        while True:
            now = self.clock()
            if run.handout and now >= next_renewal:
                self.credentials.renew(run.handout)
                next_renewal = now + renew_every
            if now >= next_beat:
                self._heartbeat(run.task_id)
                next_beat = now + self.settings.heartbeat_s
            left = min(run.deadline, next_renewal, next_beat) - now
            signal = self.store.wait_signal(run.task_id, left) if left > 0 else None
            if signal == SIGNAL_EXIT:
                self._exited(run, outcome)
                return
            if signal == SIGNAL_CANCEL:
                self._cancelled(run, outcome, started=True)
                return
            if signal is None and self.clock() >= run.deadline:
                self._stop(run)
                outcome.end(Ending.TIMED_OUT, Facts(timeout_s=run.grant.timeout_s))
                self._collect(run, outcome)
                return

    def _heartbeat(self, task_id: str) -> None:
        heartbeat(self.store, self.settings, task_id)

    def _cancelled(self, run: Run, outcome: Outcome, started: bool) -> None:
        by = self.store.get(run.task_id).get("cancel_requested_by") or "unknown"
        if started:
            self._stop(run)
            self._collect(run, outcome)
        ending = Ending.CANCELLED if started else Ending.CANCELLED_EARLY
        outcome.end(ending, Facts(cancelled_by=by))

    def _stop(self, run: Run) -> None:
        if run.container_id:
            self.runtime.stop(run.container_id, self.settings.stop_grace_s)

    def _exited(self, run: Run, outcome: Outcome) -> None:
        self._collect(run, outcome)
        status = run.status or ExitStatus(-1)
        facts = Facts(
            exit_code=status.exit_code,
            oom_killed=status.oom_killed,
            memory_limit=run.grant.limits.memory,
        )
        outcome.end(Ending.EXITED, facts)

    # -- collect -------------------------------------------------------------------------
    def _collect(self, run: Run, outcome: Outcome) -> None:
        with self.hooks.phase("collect", run.task_id) as phase:
            self._gather(run, outcome)
            phase.facts["exit_code"] = outcome.fields.get("exit_code", -1)
            phase.facts["log_bytes"] = outcome.fields.get("logs_bytes", 0)

    def _gather(self, run: Run, outcome: Outcome) -> None:
        if run.pump and not run.pump.join(timeout=10):
            log.warning("task %s: output stream did not end", run.task_id)
        fields: dict[str, Any] = {}
        if run.status is not None:
            fields["exit_code"] = run.status.exit_code
            fields["oom_killed"] = int(run.status.oom_killed)
        if run.pump:
            fields["logs_bytes"] = run.pump.kept
            fields["logs_dropped_bytes"] = run.pump.dropped
        if run.scanner:
            files: list[OutputFile] = run.scanner.files()
            fields["output"] = [f.to_json() for f in files]
            if run.scanner.error:
                fields["output_error"] = run.scanner.error
        outcome.fields.update(fields)

    # -- teardown ------------------------------------------------------------------------
    def _teardown(self, run: Run, outcome: Outcome) -> None:
        """Remove the container and record the end, whatever state things are in."""
        try:
            self._try_advance(
                run.task_id, S.TEARING_DOWN, outcome.reason, outcome=outcome.state.value
            )
        except AirlockError:
            log.exception("task %s: could not record teardown", run.task_id)
        # The task is no longer live: its credentials go while its container is removed.
        revoking = self._pool.submit(
            contextvars.copy_context().run, self.credentials.revoke, run.task_id
        )
        try:
            self._remove(run.task_id, run.container_id)
        except AirlockError as exc:
            # The reaper retries from the container's labels; the task still ends here.
            log.error("task %s: container removal failed: %s", run.task_id, exc)
            outcome.fields["cleanup_error"] = str(exc)
        finally:
            if run.pump:
                run.pump.join(timeout=5)
            self._record_revocation(revoking.result(), outcome)
            self._try_advance(run.task_id, outcome.state, outcome.reason, **outcome.fields)

    def _record_revocation(self, receipt: dict[str, Any], outcome: Outcome) -> None:
        """The receipt of what was revoked (and verified), even half-way through a task."""
        outcome.fields["revocation"] = receipt
        if not receipt.get("verified"):
            outcome.fields["revocation_pending"] = 1

    def _remove(self, task_id: str, container_id: str | None) -> None:
        if container_id:
            self.runtime.remove(container_id)
            return
        # Creation may have happened without us learning the id (an error in flight).
        for container in self.runtime.list_managed(self.settings.namespace):
            if container.task_id == task_id:
                self.runtime.remove(container.id)
