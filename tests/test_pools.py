"""Worker pools: each worker serves its own queues with its own endpoint directory, and a
task lands in the pool its spec names (or its agent's isolation class implies)."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import Client
from orchestrator.core.spec import parse
from tests.conftest import ROOT, airlock, running


def pool_worker(stack: contextlib.ExitStack, settings: Any, queue: str, concurrency: int) -> None:
    """A worker serving only `queue`, with an endpoint directory of its own."""
    endpoints = Path(tempfile.mkdtemp(prefix="al-pool-"))
    stack.enter_context(
        running(
            settings,
            "worker",
            "-Q",
            queue,
            "-c",
            str(concurrency),
            AIRLOCK_ENDPOINT_DIR=str(endpoints),
            TMPDIR=str(endpoints),
        )
    )


def node_of(worker: str) -> str:
    """The queues a worker serves, from its node name (airlock-<queues>-<pid>@<host>)."""
    found = re.fullmatch(r"airlock-(.+)-\d+@.+", worker)
    assert found, worker
    return found.group(1)


def test_tasks_land_in_the_pool_they_name(settings: Any, vault: Any, runtime: Any) -> None:
    pools = {pool: f"{settings.queue}-{pool}" for pool in ("fast", "batch")}
    with contextlib.ExitStack() as stack:
        for queue in pools.values():
            pool_worker(stack, settings, queue, 2)
        landed = {}
        for pool, queue in pools.items():
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
    assert node_of(landed["fast"]) == pools["fast"]
    assert node_of(landed["batch"]) == pools["batch"]


def test_gvisor_agents_route_to_the_gvisor_pool(settings: Any, vault: Any, runtime: Any) -> None:
    if "runsc" not in runtime.runtimes():
        pytest.skip("runsc is not registered with this Docker engine")
    routed = replace(settings, queue=f"{settings.queue}-route")
    plain, gvisor = routed.queue, f"{routed.queue}-gvisor"
    with contextlib.ExitStack() as stack:
        for queue in (plain, gvisor):
            pool_worker(stack, settings, queue, 1)
        client = Client(routed)
        sandboxed = client.submit({"agent": "sandboxed", "command": ["true"]})
        ordinary = client.submit({"agent": "tester", "command": ["true"]})
        done = {
            name: client.wait(task, timeout_s=120)
            for name, task in (("sandboxed", sandboxed), ("ordinary", ordinary))
        }
    assert done["sandboxed"]["state"] == "succeeded", done["sandboxed"]
    assert node_of(done["sandboxed"]["worker"]) == gvisor
    assert node_of(done["ordinary"]["worker"]) == plain


def test_routing_follows_an_edited_registry(settings: Any, tmp_path: Any) -> None:
    """The client keeps each agent's isolation class until its registry file changes."""
    demo = (ROOT / "agents" / "demo.yaml").read_text()
    (tmp_path / "demo.yaml").write_text(demo)
    client = Client(replace(settings, agents_dir=tmp_path))
    task = parse({"agent": "demo", "command": ["true"]})
    assert client.route(task) == settings.queue
    (tmp_path / "demo.yaml").write_text(demo.replace("isolation: runc", "isolation: gvisor"))
    assert client.route(task) == f"{settings.queue}-gvisor"
    (tmp_path / "demo.yaml").unlink()
    assert client.route(task) == settings.queue  # unreadable here: admission still decides
