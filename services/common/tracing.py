"""OpenTelemetry setup and W3C trace-context propagation over gRPC metadata and step messages.

Exporter by config: "none", "console", or "otlp" (gRPC OTLP to --otlp-endpoint, e.g. a Jaeger or
Tempo collector). One trace per request; every service's spans join it through the context
carried in gRPC metadata (unary calls) or in each step (the multiplexed stage streams)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

log = logging.getLogger(__name__)
EXPORTERS = ("none", "console", "otlp")


def setup_tracing(service: str, exporter: str = "none", endpoint: str = "", *, extra: SpanExporter | None = None) -> None:
    """Install the process-wide tracer provider once; `service` is its service.name. A second call (several services in one
    process, as in tests) keeps the first provider, so all their spans reach one exporter."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        if extra is not None:
            current.add_span_processor(SimpleSpanProcessor(extra))
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint or None, insecure=True)))
    elif exporter != "none":
        raise ValueError(f"unknown trace exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if extra is not None:
        provider.add_span_processor(SimpleSpanProcessor(extra))
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def tracer(service: str) -> trace.Tracer:
    return trace.get_tracer(f"vlmesh.{service}")


def inject(context: otel_context.Context | None = None) -> dict[str, str]:
    """A context (default: the current one) as W3C headers (traceparent, tracestate)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def metadata() -> list[tuple[str, str]]:
    return list(inject().items())


def extract(carrier: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> otel_context.Context:
    if carrier is None:
        return otel_context.Context()
    if not isinstance(carrier, Mapping):
        carrier = {k: v for k, v in carrier if isinstance(v, str)}
    return propagate.extract(carrier)


def trace_id_hex(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
