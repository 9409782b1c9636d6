"""The worker process: it registers what runs Airlock's tasks on the queue's Celery app.

Every message must carry the front door's admission ticket (`adapters.ticket`); the worker
verifies it before anything else, and records the task on arrival if its record is gone.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.signals import heartbeat_sent, worker_ready, worker_shutdown, worker_shutting_down

from orchestrator import config, wiring
from orchestrator.adapters import logs
from orchestrator.adapters.queue import REAP_TASK_NAME, TASK_NAME, celery_app
from orchestrator.adapters.ticket import InvalidTicket, TicketVerifier
from orchestrator.config import Settings, gvisor_queue
from orchestrator.core.lifecycle import TaskState
from orchestrator.task.executor import Executor
from orchestrator.task.reaper import Reaped, reap_all

log = logging.getLogger(__name__)


def create_app(settings: Settings, executor: LazyExecutor | None = None) -> Celery:
    """The Celery app with Airlock's tasks; they run on `executor` (built on first use).

    Raises ConfigError when the front door's public key (AIRLOCK_TICKET_PUBLIC_KEY) cannot
    be read: a worker that cannot tell the front door's messages from others runs nothing.
    """
    app = celery_app(settings)
    executor = executor or LazyExecutor(settings)
    tickets = TicketVerifier(settings.ticket_public_key)

    # A task that did not succeed ends as a Celery failure too, with its reason: Flower and
    # `celery events` show what Airlock shows. Expected, so logged without a traceback.
    @app.task(name=TASK_NAME, bind=True, throws=(TaskEnded,))  # type: ignore[untyped-decorator]
    def run(self: Task, *args: Any, **kwargs: Any) -> str:
        # Only a message with the front door's ticket for exactly this id, spec and queue
        # runs; anything else is refused and logged, and nothing is recorded or started.
        task_id = str(self.request.id)
        spec = kwargs.pop("spec", args[0] if args else None)
        # The trace context: the message header (as instrumented producers send it), else
        # the kwargs' copy.
        in_body = kwargs.pop("traceparent", None)
        traceparent = getattr(self.request, "traceparent", None) or in_body
        ticket = kwargs.pop("ticket", None)
        try:
            if kwargs or len(args) > 1:
                raise InvalidTicket(f"unexpected message fields: {sorted(kwargs) or len(args)}")
            verified = tickets.verify(ticket, task_id, spec)
            queue = (self.request.delivery_info or {}).get("routing_key")
            if queue and verified.queue and queue != verified.queue:
                raise InvalidTicket(f"sent to queue {queue!r}, ticket is for {verified.queue!r}")
        except InvalidTicket as exc:
            log.warning("message %.64r refused, nothing recorded or started: %s", task_id, exc)
            raise TaskEnded(f"refused: {exc}") from None
        if not isinstance(traceparent, str) or len(traceparent) > 128:
            traceparent = None
        runner = executor.get()
        runner.worker_name = str(self.request.hostname or runner.worker_name)
        state = runner.execute(task_id, spec, traceparent, verified.identities, verified.text)
        if state is not TaskState.SUCCEEDED:
            reason = runner.store.get(task_id).get("reason", "")
            raise TaskEnded(f"{state.value}: {reason}")
        return str(state.value)

    @app.task(name=REAP_TASK_NAME)  # type: ignore[untyped-decorator]
    def reap_orphans() -> int:
        return len(reap_now(executor.get()))

    return app


def reap_now(executor: Executor, dry_run: bool = False) -> list[Reaped]:
    """Everything no live task owns, found through this executor's store and engine."""
    return reap_all(
        executor.store,
        executor.runtime,
        executor.credentials,
        executor.settings.namespace,
        dry_run,
    )


class TaskEnded(Exception):
    """The task ended without succeeding (or its message was refused); the text says how."""


class LazyExecutor:
    """One executor (one Docker and one Redis client) per worker process, built on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor: Executor | None = None
        self._lock = threading.Lock()

    def get(self) -> Executor:
        with self._lock:
            if self._executor is None:
                self._executor = wiring.executor(self.settings, warm_pool=True)
            return self._executor

    def stop_all(self, why: str) -> list[str]:
        """Cancel the tasks in flight (none if no task came yet); see Executor.stop_all."""
        with self._lock:
            running = self._executor
        return running.stop_all(f"worker {running.worker_name} ({why})") if running else []

    def shutdown(self) -> None:
        with self._lock:
            if self._executor is not None and self._executor.pool is not None:
                self._executor.pool.shutdown()


def default_queues(settings: Settings) -> list[str]:
    """The default queue, and the gVisor queue when this host's engine has runsc."""
    if wiring.gvisor_available(settings):
        return [settings.queue, gvisor_queue(settings)]
    return [settings.queue]


def run_worker(
    settings: Settings | None = None,
    queues: list[str] | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    beat: bool = True,
) -> None:
    """Start a worker in this process; returns when it is shut down.

    With `beat`, it also runs the periodic reaper (turn it off where `airlock beat` runs).
    """
    settings = settings or config.load()
    logs.configure(loglevel, settings.log_format)
    # A task allocates many short-lived objects and keeps few: collecting the young
    # generation every 700 allocations (the default) took about 5% of a worker's CPU.
    gc.set_threshold(20_000, 20, 20)
    queues = queues or default_queues(settings)
    executor = LazyExecutor(settings)
    app = create_app(settings, executor)

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def reap_at_start(**_: Any) -> None:
        # The worker's own executor (its warm pool starts filling now, not at the first
        # task) reaps what an earlier worker of this host left behind.
        reap_now(executor.get())

    if settings.health_file is not None:
        alive = settings.health_file

        @heartbeat_sent.connect(weak=False)  # type: ignore[untyped-decorator]
        def touch_health_file(**_: Any) -> None:
            alive.touch()

    @worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
    def stop_tasks(sig: str = "", how: str = "", **_: Any) -> None:
        # Stopping with tasks in flight: they may finish within the drain; those left end
        # cancelled (containers stopped, credentials revoked, records final) before the
        # worker exits, rather than outlive it.
        def cancel() -> None:
            stopped = executor.stop_all(f"shutting down on {sig or 'request'}")
            if stopped:
                log.warning("shutting down (%s): cancelled %d running task(s)", how, len(stopped))

        if settings.drain_s <= 0:
            cancel()
            return
        log.warning("shutting down (%s): tasks in flight have %.0fs to end", how, settings.drain_s)
        timer = threading.Timer(settings.drain_s, cancel)
        timer.daemon = True  # the worker exits as soon as its tasks end, drained or not
        timer.start()

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def remove_warm_runners(**_: Any) -> None:
        executor.shutdown()

    beat_schedule = Path(tempfile.gettempdir()) / f"airlock-beat-{settings.namespace}"
    argv = [
        "worker",
        *(["--beat", f"--schedule={beat_schedule}"] if beat else []),
        "--pool=threads",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}",
        # Unique per process: two workers of one host on the same queues are two nodes (on
        # RabbitMQ, a second node of the same name cannot even start).
        f"--hostname=airlock-{'-'.join(queues)}-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        # Task events and heartbeats on: Flower and `celery inspect` see the workers.
        "--task-events",
    ]
    app.worker_main(argv)


def run_beat(settings: Settings | None = None, loglevel: str = "INFO") -> None:
    """The periodic scheduler alone (one per deployment): it enqueues the reaper."""
    settings = settings or config.load()
    logs.configure(loglevel, settings.log_format)
    schedule = Path(tempfile.gettempdir()) / f"airlock-beat-{settings.namespace}"
    create_app(settings).start(["beat", f"--schedule={schedule}", f"--loglevel={loglevel}"])
