"""The chaos suite in its reduced form: 30 tasks under every kind of fault, nothing leaks.

It restarts the host's dockerd, so it runs last (see conftest); the full run is
`scripts/chaos` (200 tasks by default).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.chaos, pytest.mark.docker, pytest.mark.slow]
FAULTS = {
    "worker-kill",
    "redis-restart",
    "vault-outage",
    "vault-restart",
    "gateway-restart",
    "docker-restart",
    "cancel-storm",
}


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "chaos.py"),
            "--tasks",
            "30",
            "--fault-every",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.stdout, run.stderr[-3000:]
    result: dict[str, Any] = json.loads(run.stdout)
    result["exit_status"], result["stderr"] = run.returncode, run.stderr
    return result


def test_every_fault_was_injected(report: dict[str, Any]) -> None:
    assert {f["fault"] for f in report["faults"]} == FAULTS, report["stderr"][-3000:]
    failed = [f for f in report["faults"] if "could not" in f["what"] or "skipped" in f["what"]]
    assert not failed


def test_every_task_ended_once_with_a_reason(report: dict[str, Any]) -> None:
    assert report["not_ended"] == []
    assert report["without_reason"] == []
    assert report["run_twice"] == []
    assert sum(report["by_state"].values()) == report["tasks"] == 30


def test_nothing_leaked(report: dict[str, Any]) -> None:
    assert report["leaked"] == dict.fromkeys(report["leaked"], 0), (
        report["left_leases"],
        report["left_sockets"],
    )
    assert report["exit_status"] == 0


def test_task_faults_end_as_they_should(report: dict[str, Any]) -> None:
    """Crashes, OOM and deadlines are told apart (when no injected fault got there first)."""
    reasons = report["reasons"]
    assert reasons.get("exit code 3", 0) >= 1
    assert any(r.startswith("out of memory") for r in reasons)
    assert report["by_kind"]["deadline"].get("timed_out", 0) >= 1
    assert report["by_kind"]["ok"].get("succeeded", 0) >= 1
