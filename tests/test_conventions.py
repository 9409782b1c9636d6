"""Telemetry that fits the standard tools: spans read back with the SDK's in-memory exporter
carry OpenTelemetry's semantic-convention names and span kinds, and the trace crosses the
queue in the Celery message's headers, as instrumented producers and consumers expect."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from orchestrator.adapters import telemetry
from orchestrator.adapters.store import Store
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.lifecycle import TaskState
from orchestrator.task.executor import Executor

pytestmark = pytest.mark.docker

DENIED = (
    "import urllib.request, urllib.error\n"
    "try:\n"
    "    urllib.request.urlopen('http://127.0.0.1:18080/admin', timeout=10)\n"
    "except urllib.error.HTTPError as exc:\n"
    "    print(exc.code)\n"
)


@pytest.fixture
def exported(settings: Settings, store: Store) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    telemetry.setup(settings, "worker", store).add_span_processor(processor)
    yield exporter
    exporter.shutdown()  # the processor stays, exporting nowhere


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert found, (name, sorted({s.name for s in spans}))
    return found[0]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_spans_follow_the_conventions_across_the_queue(
    settings: Settings, store: Store, executor: Executor, exported: InMemorySpanExporter
) -> None:
    spec = {"agent": "web", "command": ["python3", "-c", DENIED]}
    # A queue no worker serves: the test takes the message off it as a worker would.
    private = replace(settings, queue=f"{settings.queue}-spans")
    task_id = Client(private).submit(spec)
    # The message as a worker takes it off the queue: the trace context is in its headers.
    raw = store.redis.rpop(private.queue)
    assert raw is not None
    message = json.loads(raw)
    assert message["headers"]["id"] == task_id
    traceparent = message["headers"]["traceparent"]
    producer = one(exported.get_finished_spans(), "submit")
    assert producer.kind is SpanKind.PRODUCER
    assert attributes(producer)["messaging.destination.name"] == private.queue
    assert attributes(producer)["messaging.message.id"] == task_id
    context = producer.get_span_context()
    assert traceparent.split("-")[1:3] == [
        format(context.trace_id, "032x"),
        format(context.span_id, "016x"),
    ]

    assert executor.execute(task_id, spec, traceparent) is TaskState.SUCCEEDED
    telemetry.flush()
    spans = [s for s in exported.get_finished_spans() if s.context.trace_id == context.trace_id]

    task = one(spans, "task")
    assert task.kind is SpanKind.CONSUMER and task.parent is not None
    assert task.parent.span_id == context.span_id  # the consumer follows the producer
    for phase in ("admit", "provision", "launch", "run", "collect", "teardown"):
        assert one(spans, phase).kind is SpanKind.INTERNAL
    provision = attributes(one(spans, "provision"))
    assert provision["container.image.name"] == "airlock-runner:latest"
    assert provision["container.runtime.name"] == "runc"
    assert len(attributes(one(spans, "launch"))["container.id"]) == 64
    assert attributes(one(spans, "collect"))["process.exit.code"] == 0

    vault = [s for s in spans if s.name.startswith("vault ")]
    assert vault and all(s.kind is SpanKind.CLIENT for s in vault)
    first = attributes(vault[0])
    assert first["http.request.method"] in ("GET", "POST", "PUT", "DELETE", "LIST")
    assert first["server.address"] and first["url.path"].startswith("/v1/")

    docker = [s for s in spans if s.name.startswith("docker ")]
    assert {"docker POST /containers/create", "docker POST /containers/{id}/start"} <= {
        s.name for s in docker
    }
    assert all(s.kind is SpanKind.CLIENT for s in docker)
    assert all(attributes(s)["http.response.status_code"] < 400 for s in docker)

    egress = [s for s in spans if s.name.startswith("egress ")]
    assert egress and all(s.kind is SpanKind.SERVER for s in egress)
    denied = attributes(next(s for s in egress if attributes(s)["airlock.decision"] == "deny"))
    assert denied["http.request.method"] == "GET"
    assert denied["server.address"] == "127.0.0.1" and denied["server.port"] == 18080
    assert denied["url.path"] == "/admin"
    assert denied["http.response.status_code"] == 403
    assert denied["error.type"] == "airlock.denied"
    assert denied["airlock.rule"] == "plain"
    # No home-made names for what the conventions name.
    for span in spans:
        assert not {"airlock.container_id", "airlock.exit_code", "airlock.method"} & set(
            attributes(span)
        ), span.name


def test_a_failed_task_says_so_in_its_span(
    executor: Executor, exported: InMemorySpanExporter
) -> None:
    task_id = str(uuid.uuid4())
    assert executor.execute(task_id, {"agent": "tester", "command": ["false"]}) is (
        TaskState.FAILED
    )
    telemetry.flush()
    task = next(
        s
        for s in exported.get_finished_spans()
        if s.name == "task" and attributes(s).get("airlock.task_id") == task_id
    )
    assert task.status.status_code.name == "ERROR"
    assert attributes(task)["error.type"] == "failed"
