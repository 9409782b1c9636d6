"""One task, one trace: every phase and every egress decision, with correct parents."""

from __future__ import annotations

import json
import uuid
from typing import Any

from orchestrator.client import Client
from orchestrator.executor import Executor
from orchestrator.lifecycle import TaskState
from orchestrator.store import Store
from tests.conftest import airlock
from tests.test_gateway import upstreams  # noqa: F401  (the fixture)
from tests.upstream import HTTP_PORT, Upstreams

PHASES = ["admit", "provision", "launch", "run", "teardown"]


def spans_by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    named: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        named.setdefault(span["name"], []).append(span)
    return named


def test_a_task_is_one_trace_with_the_gateway_under_its_run(
    executor: Executor,
    store: Store,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    task_id = str(uuid.uuid4())
    script = (
        "import urllib.request, urllib.error\n"
        f"urllib.request.urlopen('http://127.0.0.1:{HTTP_PORT}/api/traced', timeout=10)\n"
        "try:\n"
        f"    urllib.request.urlopen('http://127.0.0.1:{HTTP_PORT}/admin', timeout=10)\n"
        "except urllib.error.HTTPError:\n    pass\n"
    )
    assert executor.execute(task_id, {"agent": "web", "command": ["python3", "-c", script]}) is (
        TaskState.SUCCEEDED
    )
    spans = Client(executor.settings).trace(task_id)
    named = spans_by_name(spans)
    assert {span["trace_id"] for span in spans} == {store.get(task_id)["trace_id"]}
    [root] = named["task"]
    assert root["attributes"]["airlock.terminal_state"] == "succeeded"
    assert root["attributes"]["airlock.agent"] == "web"
    for phase in PHASES:
        [span] = named[phase]
        assert span["parent_id"] == root["span_id"], phase
    run = named["run"][0]
    egress = [s for s in spans if s["name"].startswith("egress ")]
    assert len(egress) == 2 and all(s["parent_id"] == run["span_id"] for s in egress)
    decisions = sorted(s["attributes"]["airlock.decision"] for s in egress)
    assert decisions == ["allow", "deny"]
    denied = next(s for s in egress if s["attributes"]["airlock.decision"] == "deny")
    assert denied["status"] == "ERROR" and "path is outside" in denied["status_description"]
    admit = named["admit"][0]["attributes"]
    assert admit["airlock.grant_hash"].startswith("sha256:")
    assert admit["airlock.policy_version"].startswith("sha256:")
    assert named["teardown"][0]["attributes"]["airlock.revocation_verified"] is True


def test_a_rejected_task_says_why_in_its_trace(executor: Executor) -> None:
    task_id = str(uuid.uuid4())
    assert executor.execute(task_id, {"agent": "ghost", "command": ["true"]}) is TaskState.REJECTED
    named = spans_by_name(Client(executor.settings).trace(task_id))
    [root] = named["task"]
    assert root["status"] == "ERROR" and root["status_description"] == "unknown agent 'ghost'"
    assert named["admit"][0]["attributes"]["airlock.decision"] == "rejected"
    assert "provision" not in named


def test_a_timed_out_task_says_why_in_its_trace(executor: Executor) -> None:
    task_id = str(uuid.uuid4())
    state = executor.execute(
        task_id, {"agent": "tester", "command": ["sleep", "30"], "timeout_s": 1}
    )
    assert state is TaskState.TIMED_OUT
    root = spans_by_name(Client(executor.settings).trace(task_id))["task"][0]
    assert root["status"] == "ERROR"
    assert root["attributes"]["airlock.terminal_state"] == "timed_out"
    assert "deadline of 1s reached" in root["attributes"]["airlock.reason"]


def test_trace_command_from_submit_to_the_end(settings: Any, worker: Any) -> None:
    """Through the CLI and a real worker: the submit span and the worker's phases share a trace."""
    submitted = airlock(settings, "submit", "-a", "tester", "--wait", "--json", "--", "true")
    task_id = json.loads(submitted.stdout)["id"]
    spans = []
    for _ in range(50):  # the worker's batch exporter writes within a fraction of a second
        shown = airlock(settings, "trace", task_id, "--json")
        spans = json.loads(shown.stdout) if shown.returncode == 0 else []
        if {"submit", "task", "teardown"} <= {s["name"] for s in spans}:
            break
    named = spans_by_name(spans)
    assert named["task"][0]["parent_id"] == named["submit"][0]["span_id"]
    assert all(phase in named for phase in PHASES)
    human = airlock(settings, "trace", task_id)
    assert human.returncode == 0 and "teardown" in human.stdout and "█" in human.stdout
