"""Celery's own tools see Airlock as it is: workers send task events and heartbeats (what
Flower and `celery events` read), answer `celery inspect`, and a task that does not succeed
ends as a failure in Celery too, with Airlock's reason."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from orchestrator.adapters.queue import TASK_NAME, celery_app
from orchestrator.client import Client
from orchestrator.config import Settings

pytestmark = pytest.mark.docker


class Events:
    """Every Celery event on the broker, gathered on a thread until closed."""

    def __init__(self, settings: Settings) -> None:
        self.app = celery_app(settings)
        self.seen: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._receiver: Any = None
        self._thread.start()
        assert self.ready.wait(30), "could not listen for Celery events"

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.seen.append})
            self.ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=True)

    def wait_for(self, match: Any, seconds: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for event in list(self.seen):
                if match(event):
                    return event
            time.sleep(0.05)
        kinds = sorted({e.get("type", "?") for e in self.seen})
        pytest.fail(f"no matching Celery event; saw {kinds}")

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)


def test_flower_and_inspect_see_the_worker_and_the_true_end_of_each_task(
    settings: Settings, worker: Any
) -> None:
    events = Events(settings)
    try:
        # Heard once a worker's heartbeat arrives: from then on nothing is missed.
        heartbeat = events.wait_for(lambda e: e["type"] == "worker-heartbeat", seconds=10)
        assert heartbeat["hostname"].startswith("airlock-")
        client = Client(settings)
        failed = client.submit({"agent": "tester", "command": ["sh", "-c", "exit 3"]})
        fine = client.submit({"agent": "tester", "command": ["true"]})
        event = events.wait_for(lambda e: e["type"] == "task-failed" and e["uuid"] == failed)
        assert "failed: exit code 3" in event["exception"], event
        events.wait_for(lambda e: e["type"] == "task-succeeded" and e["uuid"] == fine)
        started = [e["uuid"] for e in events.seen if e["type"] == "task-started"]
        assert failed in started and fine in started
    finally:
        events.close()
    answers = events.app.control.inspect(timeout=5).ping() or {}
    assert any(name.startswith("airlock-") for name in answers), answers


def test_a_refused_message_fails_in_celery_with_why(settings: Settings, worker: Any) -> None:
    events = Events(settings)
    try:
        events.wait_for(lambda e: e["type"] == "worker-heartbeat", seconds=10)  # listening
        task_id = str(uuid.uuid4())
        events.app.send_task(
            TASK_NAME,
            kwargs={"spec": {"agent": "tester", "command": ["true"]}},
            task_id=task_id,
            queue=settings.queue,
        )
        event = events.wait_for(lambda e: e["type"] == "task-failed" and e["uuid"] == task_id)
        assert "refused" in event["exception"] and "ticket" in event["exception"], event
    finally:
        events.close()
