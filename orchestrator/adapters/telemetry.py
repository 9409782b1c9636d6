"""Tracing, set up in one place: one trace per task, from submit to the last egress request.

With OTEL_EXPORTER_OTLP_ENDPOINT set (and the OTLP exporter package installed), spans go to
that collector; otherwise they go to an embedded store in Redis, bounded by count and age,
which `airlock trace` reads. Context crosses process boundaries as a W3C traceparent:
in the Celery message, in the container's TRACEPARENT, and into the gateway.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orchestrator.adapters.store import Store
from orchestrator.config import Settings

log = logging.getLogger(__name__)
PROPAGATOR = TraceContextTextMapPropagator()
MAX_SPANS_PER_TRACE = 5000
_provider: TracerProvider | None = None


def span_record(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    parent = span.parent
    resource = span.resource.attributes if span.resource else {}
    return {
        "name": span.name,
        "trace_id": format(context.trace_id, "032x") if context else "",
        "span_id": format(context.span_id, "016x") if context else "",
        "parent_id": format(parent.span_id, "016x") if parent else None,
        "start": span.start_time,
        "end": span.end_time,
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "service": resource.get("service.name"),
        "host": resource.get("host.name"),  # which machine: a trace crosses several
    }


class RedisSpanExporter(SpanExporter):
    """The embedded span store: one bounded list per trace, expiring with task records."""

    def __init__(self, store: Store, max_age_s: int) -> None:
        self.store = store
        self.max_age_s = max_age_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        by_trace: dict[str, list[str]] = {}
        for span in spans:
            record = span_record(span)
            by_trace.setdefault(record["trace_id"], []).append(json.dumps(record, default=str))
        try:
            self.store.append_spans(by_trace, MAX_SPANS_PER_TRACE, self.max_age_s)
        except Exception as exc:  # tracing must never take a task down
            log.warning("spans not stored: %s", exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.store.spans(trace_id)]

    def shutdown(self) -> None:
        pass


def otlp_protocol(signal: str) -> str:
    """The OTLP protocol for `signal` (traces, metrics), as the SDK documents it:
    OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL, else
    http/protobuf."""
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def _exporter(settings: Settings, store: Store) -> SpanExporter:
    if settings.otel_endpoint:
        try:
            # Lazy on purpose: the exporters are optional, and loaded only for a collector.
            exporter: SpanExporter
            if otlp_protocol("traces") == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcSpanExporter,
                )

                exporter = GrpcSpanExporter()  # reads the OTEL_EXPORTER_OTLP_* variables
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                exporter = OTLPSpanExporter()
            return exporter
        except ImportError as exc:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but its exporter is not installed "
                "(%s; for grpc: pip install 'airlock[otlp-grpc]'); keeping spans in Redis",
                exc.name,
            )
    return RedisSpanExporter(store, settings.record_ttl_s)


def setup(settings: Settings, component: str, store: Store) -> TracerProvider:
    """Install the tracer provider of this process (once); without a collector, spans are
    kept in `store`."""
    global _provider
    if _provider is None and not settings.tracing:
        _provider = TracerProvider()  # records nothing: no processor, no exporter
        return _provider
    if _provider is None:
        attributes = {
            "service.namespace": settings.namespace,
            "host.name": socket.gethostname(),
            "airlock.component": component,
        }
        if not os.environ.get("OTEL_SERVICE_NAME"):  # a name the deployment set is kept as is
            attributes["service.name"] = f"{settings.otel_service_name}-{component}"
        resource = Resource.create(attributes)
        _setup_metrics(settings, resource)
        _provider = TracerProvider(resource=resource)
        _provider.add_span_processor(
            BatchSpanProcessor(_exporter(settings, store), schedule_delay_millis=200)
        )
        trace.set_tracer_provider(_provider)
    return _provider


def flush() -> None:
    if _provider is not None:
        _provider.force_flush(5000)
    if _meters is not None:
        _meters.force_flush(5000)


class Metrics:
    """The instruments ops watch. Exported over OTLP when a collector is configured."""

    def __init__(self) -> None:
        meter = metrics.get_meter("airlock")
        self.tasks = meter.create_counter(
            "airlock.tasks", unit="{task}", description="tasks by terminal state"
        )
        self.start_latency = meter.create_histogram(
            "airlock.start_latency", unit="s", description="admission to command running"
        )
        self.duration = meter.create_histogram(
            "airlock.task.duration", unit="s", description="a task's life, submit to teardown"
        )
        self.running = meter.create_up_down_counter(
            "airlock.running", unit="{task}", description="tasks whose command is running"
        )
        self.egress = meter.create_counter(
            "airlock.egress.decisions", unit="{decision}", description="egress decisions by outcome"
        )
        self.egress_duration = meter.create_histogram(
            "airlock.egress.duration", unit="s", description="an egress request at the gateway"
        )
        self.revocation_failures = meter.create_counter(
            "airlock.revocation.failures",
            unit="{task}",
            description="teardowns whose revocation was not verified",
        )


_meters: MeterProvider | None = None
_metrics: Metrics | None = None


def meters() -> Metrics:
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def _setup_metrics(settings: Settings, resource: Resource) -> None:
    global _meters
    readers = []
    if settings.otel_endpoint:
        try:
            # Lazy on purpose: as the span exporter.
            if otlp_protocol("metrics") == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                    OTLPMetricExporter as GrpcMetricExporter,
                )

                readers.append(PeriodicExportingMetricReader(GrpcMetricExporter()))
            else:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter,
                )

                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        except ImportError as exc:
            log.warning("OTLP metric exporter %s not installed; metrics are not exported", exc.name)
    if not readers:
        return  # nothing would read them: the instruments stay no-ops, at no cost per task
    _meters = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(_meters)


# A proxy: it finds the provider set up later (get_tracer builds a new tracer per call).
_TRACER = trace.get_tracer("airlock")


def tracer() -> trace.Tracer:
    return _TRACER


def inject(context: Context | None = None) -> str | None:
    """The traceparent of `context` (the current span by default)."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=context)
    return carrier.get("traceparent")


def current_trace_id() -> str:
    """The current span's trace id, as 32 hex digits."""
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


def extract(traceparent: str | None) -> Context | None:
    if not traceparent:
        return None
    return PROPAGATOR.extract({"traceparent": traceparent})
