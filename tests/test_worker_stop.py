"""A worker told to stop (SIGTERM, as `docker stop` and Kubernetes send it) with tasks in
flight: those that end within AIRLOCK_DRAIN_S finish as usual, the others end cancelled
(containers stopped, credentials revoked and verified) before the worker exits. Nothing
outlives it: no container, no endpoint."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.client import Client
from orchestrator.config import Settings
from tests.conftest import airlock, running

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def submit(settings: Settings, queue: str, *command: str) -> str:
    proc = airlock(
        settings, "submit", "--agent", "tester", "--queue", queue, "--json", "--", *command
    )
    assert proc.returncode == 0, proc.stderr
    task_id: str = json.loads(proc.stdout)["id"]
    return task_id


def test_a_stopping_worker_drains_then_cancels_what_is_left(
    settings: Settings, store: Store, runtime: DockerRuntime, vault: Vault, tmp_path: Path
) -> None:
    queue = f"{settings.queue}-stop-{uuid.uuid4().hex[:6]}"
    client = Client(settings)
    argv = ("worker", "--queue", queue, "--concurrency", "2", "--no-beat")
    with running(settings, *argv, AIRLOCK_DRAIN_S="5", TMPDIR=str(tmp_path)) as worker:
        short = submit(settings, queue, "sleep", "2")
        long = submit(settings, queue, "sleep", "120")
        for _ in range(300):
            if {client.status(t)["state"] for t in (short, long)} == {"running"}:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the tasks never ran")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    ended: dict[str, Any] = {t: client.status(t) for t in (short, long)}
    assert ended[short]["state"] == "succeeded"  # it ended within the drain
    assert ended[long]["state"] == "cancelled"
    reason = ended[long]["reason"]
    assert reason.startswith("cancelled by worker ") and reason.endswith(
        "(shutting down on SIGTERM)"
    )
    assert ended[long]["revocation"]["verified"] is True
    left = [c for c in runtime.list_managed(settings.namespace) if c.task_id in (short, long)]
    assert left == []
    assert not (settings.endpoint_dir / settings.namespace / long).exists()
