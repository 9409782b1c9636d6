"""The Celery application: task name, delivery settings, and the worker entry point.

Message contract for producers in any language (Celery protocol 2, JSON):
    task name  "airlock.run"
    task id    the Airlock task id (any unique string, a UUID is customary)
    kwargs     {"spec": {...}}, the task spec as in `airlock spec schema`
    queue      the spec's `queue`, or the deployment's default queue ("airlock")
A producer that does not create the task record first may do so: the worker records the
task on arrival, validates the spec and rejects it with reasons if it is malformed.
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
from celery.signals import worker_ready, worker_shutdown

from orchestrator import config, logs
from orchestrator.config import Settings, gvisor_queue
from orchestrator.errors import AirlockError
from orchestrator.executor import Executor
from orchestrator.pool import WarmPool, pool_sizes
from orchestrator.reaper import Reaped, reap, reap_credentials, reap_endpoints, reap_tasks

TASK_NAME = "airlock.run"
REAP_TASK_NAME = "airlock.reap"
log = logging.getLogger(__name__)


def create_app(settings: Settings, executor: _LazyExecutor | None = None) -> Celery:
    """The Celery app; a worker passes the executor its tasks run on (built on first use)."""
    broker = settings.broker_url or settings.redis_url
    app = Celery("airlock", broker=broker, set_as_current=False)
    app.conf.update(
        # Plain redis:// URLs get kombu's Redis transport with a shared client (see broker.py).
        broker_transport="orchestrator.broker:Transport" if broker.startswith("redis://") else None,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A task is acknowledged only once it has ended, and given back if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.max_timeout_s + 600},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=3,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_create_missing_queues=True,
        beat_schedule={
            "airlock-reap": {"task": REAP_TASK_NAME, "schedule": settings.reap_period_s},
        },
    )
    executor = executor or _LazyExecutor(settings)

    @app.task(name=TASK_NAME, bind=True)  # type: ignore[untyped-decorator]
    def run(self: Task, *args: Any, **kwargs: Any) -> str:
        # Any producer may send anything: a malformed message is recorded as a rejected
        # task (the spec parser says why), never an exception that stops the worker.
        spec = kwargs.pop("spec", args[0] if args else None)
        traceparent = kwargs.pop("traceparent", None)
        if kwargs or len(args) > 1:
            spec = {
                "agent": spec.get("agent") if isinstance(spec, dict) else None,
                "message": f"unexpected message fields: {sorted(kwargs) or len(args)}",
            }
        if not isinstance(traceparent, str) or len(traceparent) > 128:
            traceparent = None
        runner = executor.get()
        runner.worker_name = str(self.request.hostname or runner.worker_name)
        return runner.execute(str(self.request.id), spec, traceparent).value

    @app.task(name=REAP_TASK_NAME)  # type: ignore[untyped-decorator]
    def reap_orphans() -> int:
        return len(reap_now(executor.get()))

    return app


def reap_now(executor: Executor, dry_run: bool = False) -> list[Reaped]:
    """Containers first (ending overrun tasks), then live tasks nobody runs any more, then
    the credentials and endpoints of every task that has ended."""
    store, credentials = executor.store, executor.credentials
    found = reap(store, executor.runtime, executor.settings.namespace, dry_run)
    found += reap_tasks(store, executor.runtime, executor.settings.namespace, dry_run)
    found += reap_credentials(store, credentials, dry_run)
    found += reap_endpoints(store, credentials, dry_run)
    for item in found:
        log.warning("reaped %s of task %s: %s", item.kind, item.task_id, item.why)
    return found


class _LazyExecutor:
    """One executor (one Docker and one Redis client) per worker process, built on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor: Executor | None = None
        self._lock = threading.Lock()

    def get(self) -> Executor:
        with self._lock:
            if self._executor is None:
                self._executor = build_executor(self.settings, warm_pool=True)
            return self._executor

    def shutdown(self) -> None:
        with self._lock:
            if self._executor is not None and self._executor.pool is not None:
                self._executor.pool.shutdown()


def build_executor(settings: Settings, warm_pool: bool = False) -> Executor:
    """The worker's executor; with `warm_pool`, its warm runners start filling at once."""
    from orchestrator.credentials import Credentials
    from orchestrator.runtime.docker_engine import DockerRuntime
    from orchestrator.store import Store

    connections = settings.worker_concurrency * 3 + 2
    store = Store(settings.redis_url, settings.namespace, settings.record_ttl_s, ride_out_s=15)
    # A worker rides out an engine restart of a few seconds instead of failing its tasks.
    runtime = DockerRuntime(settings.docker_host, max_pool_size=connections, ride_out_s=15)
    # So it does a Vault restart: a task minted meanwhile waits for it instead of failing.
    credentials = Credentials(settings, store, ride_out_s=15)
    executor = Executor(settings, store, runtime, credentials=credentials)
    if warm_pool and (settings.pool_size or settings.pool_gvisor_size):
        sizes = pool_sizes(settings, runtime.runtimes())
        executor.pool = WarmPool(settings, store, runtime, credentials.endpoints, sizes)
        executor.pool.start()
    return executor


def default_queues(settings: Settings) -> list[str]:
    """The default queue, and the gVisor queue when this host's engine has runsc."""
    from orchestrator.runtime.docker_engine import DockerRuntime

    try:
        gvisor = "runsc" in DockerRuntime(settings.docker_host).runtimes()
    except AirlockError:
        gvisor = False
    return [settings.queue, gvisor_queue(settings)] if gvisor else [settings.queue]


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
    executor = _LazyExecutor(settings)
    app = create_app(settings, executor)

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def reap_at_start(**_: Any) -> None:
        reap_now(build_executor(settings))
        executor.get()  # the warm pool starts filling now, not at the first task

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def remove_warm_runners(**_: Any) -> None:
        executor.shutdown()

    beat_schedule = Path(tempfile.gettempdir()) / f"airlock-beat-{settings.namespace}"
    argv = [
        "worker",
        *(["--beat", f"--schedule={beat_schedule}"] if beat else []),
        "--pool=threads",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--queues={','.join(queues or [settings.queue])}",
        f"--loglevel={loglevel}",
        # Unique per process: two workers of one host on the same queues are two nodes (on
        # RabbitMQ, a second node of the same name cannot even start).
        f"--hostname=airlock-{'-'.join(queues or [settings.queue])}-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv)


def run_beat(settings: Settings | None = None, loglevel: str = "INFO") -> None:
    """The periodic scheduler alone (one per deployment): it enqueues the reaper."""
    settings = settings or config.load()
    logs.configure(loglevel, settings.log_format)
    schedule = Path(tempfile.gettempdir()) / f"airlock-beat-{settings.namespace}"
    create_app(settings).start(["beat", f"--schedule={schedule}", f"--loglevel={loglevel}"])
