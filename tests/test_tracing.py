"""One task, one trace: every phase and every egress decision, with correct parents."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from orchestrator import wiring
from orchestrator.adapters.store import Store
from orchestrator.cli import render
from orchestrator.client import Client
from orchestrator.core import waterfall
from orchestrator.core.lifecycle import TaskState
from orchestrator.task.executor import Executor
from tests.conftest import airlock, running
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
    executor.credentials.audit.flush()
    from orchestrator.adapters.gateway.audit import AuditLog

    audited = AuditLog(store).records(task_id)
    assert {r["trace_id"] for r in audited} == {store.get(task_id)["trace_id"]}
    vault = {s["name"]: s["parent_id"] for s in spans if s["name"].startswith("vault ")}
    provision, teardown = named["provision"][0]["span_id"], named["teardown"][0]["span_id"]
    assert vault["vault POST auth/token/create/airlock-web"] == provision
    assert vault["vault POST transit/sign/airlock-task-jwt"] == provision
    assert vault["vault POST auth/token/revoke-accessor"] == teardown
    assert vault["vault POST auth/token/lookup-accessor"] == teardown  # the verification


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


class OtlpReceiver:
    """A real OTLP/HTTP trace receiver: decodes the protobuf payloads the exporters send."""

    def __init__(self) -> None:
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        received: list[dict[str, Any]] = []
        metric_names: set[str] = set()
        self.spans = received
        self.metrics = metric_names

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/metrics":
                    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
                        ExportMetricsServiceRequest,
                    )

                    export = ExportMetricsServiceRequest()
                    export.ParseFromString(body)
                    for resource_metrics in export.resource_metrics:
                        for scope in resource_metrics.scope_metrics:
                            metric_names.update(m.name for m in scope.metrics)
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    for resource_spans in request.resource_spans:
                        service = {
                            a.key: a.value.string_value for a in resource_spans.resource.attributes
                        }["service.name"]
                        for scope in resource_spans.scope_spans:
                            for span in scope.spans:
                                received.append(
                                    {
                                        "name": span.name,
                                        "service": service,
                                        "trace_id": span.trace_id.hex(),
                                        "span_id": span.span_id.hex(),
                                        "parent_id": span.parent_span_id.hex() or None,
                                        "attributes": {a.key: a.value for a in span.attributes},
                                    }
                                )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_spans_reach_an_otlp_collector_as_one_trace(
    settings: Any,
    store: Store,
    upstreams: Upstreams,  # noqa: F811
    tmp_path: Any,
) -> None:
    import time

    receiver = OtlpReceiver()
    queue = f"{settings.queue}-otlp"
    otlp = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "AIRLOCK_QUEUE": queue,
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
    }
    exported = {"airlock.tasks", "airlock.start_latency", "airlock.egress.decisions"}
    try:
        with running(settings, "worker", "-c", "1", TMPDIR=str(tmp_path), **otlp):
            script = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{HTTP_PORT}/api/otlp')"
            done = airlock(
                settings,
                "submit",
                "-a",
                "web",
                "--wait",
                "--json",
                "--",
                "python3",
                "-c",
                script,
                **otlp,
            )
            assert done.returncode == 0, done.stderr
            task_id = json.loads(done.stdout)["id"]
            for _ in range(100):  # the worker's batch processor exports within a moment
                names = {s["name"] for s in receiver.spans}
                if (
                    {"submit", "task", "teardown"} <= names
                    and exported <= receiver.metrics
                    and any(n.startswith("egress") for n in names)
                ):
                    break
                time.sleep(0.1)
    finally:
        receiver.close()
    named = spans_by_name(receiver.spans)
    [root] = [
        s for s in named["task"] if s["attributes"]["airlock.task_id"].string_value == task_id
    ]
    trace = [s for s in receiver.spans if s["trace_id"] == root["trace_id"]]
    by_name = spans_by_name(trace)
    assert by_name["submit"][0]["service"] == "airlock-client"
    assert root["service"] == "airlock-worker"
    assert root["parent_id"] == by_name["submit"][0]["span_id"]
    for phase in PHASES:
        assert by_name[phase][0]["parent_id"] == root["span_id"], phase
    [egress] = [s for s in trace if s["name"].startswith("egress ")]
    assert egress["parent_id"] == by_name["run"][0]["span_id"]
    assert egress["attributes"]["airlock.decision"].string_value == "allow"
    assert {
        "airlock.tasks",
        "airlock.start_latency",
        "airlock.egress.decisions",
        "airlock.running",
    } <= receiver.metrics


def test_logs_are_json_with_task_and_trace_ids(settings: Any, store: Any) -> None:
    import logging

    from orchestrator.adapters import logs, telemetry

    telemetry.setup(settings, "worker", store)
    record = logging.LogRecord(
        "orchestrator.task.executor",
        logging.WARNING,
        __file__,
        1,
        "task %s: something happened",
        ("t-1",),
        None,
    )
    token = logs.current_task.set("t-1")
    try:
        with telemetry.tracer().start_as_current_span("probe") as span:
            line = json.loads(logs.JsonFormatter().format(record))
            expected_trace = format(span.get_span_context().trace_id, "032x")
    finally:
        logs.current_task.reset(token)
    assert line["task_id"] == "t-1" and line["trace_id"] == expected_trace
    assert line["level"] == "warning" and line["message"] == "task t-1: something happened"


def test_vault_down_and_cancel_say_why_in_their_traces(
    settings: Any, store: Store, runtime: Any, executor: Executor
) -> None:
    import threading
    import time
    from dataclasses import replace

    cut_off = replace(settings, vault_addr="http://127.0.0.1:1")
    credentials = wiring.credentials(cut_off, store)
    try:
        broken = Executor(cut_off, store, runtime, credentials=credentials)
        task_id = str(uuid.uuid4())
        assert broken.execute(task_id, {"agent": "tester", "command": ["true"]}) is (
            TaskState.FAILED
        )
    finally:
        credentials.endpoints.shutdown()
    named = spans_by_name(Client(settings).trace(task_id))
    assert named["task"][0]["status_description"].startswith("error: vault is unreachable")
    assert named["provision"][0]["status"] == "ERROR"

    cancelled = str(uuid.uuid4())
    runner = threading.Thread(
        target=executor.execute, args=(cancelled, {"agent": "tester", "command": ["sleep", "60"]})
    )
    runner.start()
    for _ in range(300):
        if store.redis.exists(store.key(cancelled)) and store.get(cancelled)["state"] == "running":
            break
        time.sleep(0.02)
    Client(settings).cancel(cancelled, by="alice")
    runner.join(timeout=30)
    root = spans_by_name(Client(settings).trace(cancelled))["task"][0]
    assert root["attributes"]["airlock.terminal_state"] == "cancelled"
    assert root["status_description"] == "cancelled by alice"
    assert "collect" in spans_by_name(Client(settings).trace(cancelled))


def test_a_trace_across_machines_names_the_host_of_each_span(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def span(span_id: str, parent: str | None, name: str, host: str) -> dict[str, Any]:
        return {"span_id": span_id, "parent_id": parent, "name": name, "start": 0,
                "end": 10**6, "host": host, "status": "OK", "attributes": {}}  # fmt: skip

    crossing = [span("a", None, "submit", "api-1"), span("b", "a", "task", "worker-2")]
    found = waterfall.rows(crossing)
    assert [row.host for row in found] == ["api-1", "worker-2"]
    assert waterfall.across_hosts(found)
    render.waterfall(crossing, width=20)
    shown = capsys.readouterr().out
    assert "HOST" in shown and "worker-2" in shown
    one = [span("a", None, "submit", "h"), span("b", "a", "task", "h")]
    assert not waterfall.across_hosts(waterfall.rows(one))
    render.waterfall(one, width=20)
    assert "HOST" not in capsys.readouterr().out
