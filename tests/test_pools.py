"""Worker pools: each worker serves its own queues with its own endpoint directory, and a
task lands in the pool its spec names."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.conftest import airlock, airlock_env


def test_tasks_land_in_the_pool_they_name(settings: Any, vault: Any, runtime: Any) -> None:
    pools = {}
    workers = []
    try:
        for pool in ("fast", "batch"):
            queue = f"{settings.queue}-{pool}"
            endpoints = Path(tempfile.mkdtemp(prefix=f"al-{pool}-"))
            pools[pool] = (queue, endpoints)
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "orchestrator",
                        "worker",
                        "-Q",
                        queue,
                        "-c",
                        "2",
                        "--loglevel",
                        "WARNING",
                    ],
                    env=airlock_env(
                        settings, AIRLOCK_ENDPOINT_DIR=str(endpoints), TMPDIR=str(endpoints)
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        landed = {}
        for pool, (queue, _) in pools.items():
            script = "import os; print(os.path.exists('/run/airlock-endpoint/airlock.sock'))"
            done = airlock(
                settings,
                "submit",
                "-a",
                "tester",
                "--queue",
                queue,
                "--wait",
                "--json",
                "--",
                "python3",
                "-c",
                script,
            )
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert result["logs"] == "True\n"
            landed[pool] = result["worker"]
        assert landed["fast"].startswith(f"airlock-{pools['fast'][0]}@")
        assert landed["batch"].startswith(f"airlock-{pools['batch'][0]}@")
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=20)


def test_gvisor_agents_route_to_the_gvisor_pool(settings: Any, vault: Any, runtime: Any) -> None:
    from dataclasses import replace

    from orchestrator.client import Client

    if "runsc" not in runtime.runtimes():
        import pytest

        pytest.skip("runsc is not registered with this Docker engine")
    routed = replace(settings, queue=f"{settings.queue}-route")
    plain, gvisor = routed.queue, f"{routed.queue}-gvisor"
    workers = []
    try:
        for queue in (plain, gvisor):
            endpoints = Path(tempfile.mkdtemp(prefix="al-route-"))
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "orchestrator",
                        "worker",
                        "-Q",
                        queue,
                        "-c",
                        "1",
                        "--loglevel",
                        "WARNING",
                    ],
                    env=airlock_env(
                        settings, AIRLOCK_ENDPOINT_DIR=str(endpoints), TMPDIR=str(endpoints)
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        client = Client(routed)
        sandboxed = client.submit({"agent": "sandboxed", "command": ["true"]})
        ordinary = client.submit({"agent": "tester", "command": ["true"]})
        done = {
            name: client.wait(task, timeout_s=120)
            for name, task in (("sandboxed", sandboxed), ("ordinary", ordinary))
        }
        assert done["sandboxed"]["state"] == "succeeded", done["sandboxed"]
        assert done["sandboxed"]["worker"].startswith(f"airlock-{gvisor}@")
        assert done["ordinary"]["worker"].startswith(f"airlock-{plain}@")
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=20)
