"""OpenTelemetry set-up, configured only by the standard ``OTEL_*`` variables.

Spans are exported over OTLP (``OTEL_EXPORTER_OTLP_PROTOCOL``, default ``http/protobuf``) when an
endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT``) or
``OTEL_TRACES_EXPORTER=otlp`` is set; the sampler comes from ``OTEL_TRACES_SAMPLER``. Every span
gets the correlation id and the event being handled from the messaging context.

One span per SQL statement is opt-in: ``TRIBUTARY_TRACE_SQL=true``. They were two thirds of all
spans, and each statement paid for its span even in a trace that is not sampled.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import unquote

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from tributary.contracts.pii import scrub_text
from tributary.messaging import context

log = logging.getLogger("tributary.observability")

TRACE_SQL = "TRIBUTARY_TRACE_SQL"
"""Environment variable: ``true`` records a span per SQL statement (off by default)."""
CORRELATION_ID = "tributary.correlation_id"
EVENT_ID = "cloudevents.event_id"
EVENT_TYPE = "cloudevents.event_type"


class ContextAttributes(SpanProcessor):
    """Puts the correlation id, event id and type of the current message on every span."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        ctx = context.current()
        if ctx.correlation_id:
            span.set_attribute(CORRELATION_ID, ctx.correlation_id)
        if ctx.event_id:
            span.set_attribute(EVENT_ID, ctx.event_id)
        if ctx.event_type:
            span.set_attribute(EVENT_TYPE, ctx.event_type)

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _exporter() -> SpanExporter | None:
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_name == "none" or (not endpoint and exporter_name != "otlp"):
        return None
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def setup_tracing(service: str) -> TracerProvider | None:
    """Install the global tracer provider for ``service`` (once per process)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    current: Any = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(ContextAttributes())
    exporter = _exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on (exporter: %s)", type(exporter).__name__ if exporter else "none")
    return provider


# where HTTP instrumentation records the URL (old and new semantic-convention names)
_URL_ATTRIBUTES = ("http.target", "http.url", "url.query", "url.full")


def _mask_url(span: Any, scope: dict[str, Any]) -> None:
    """Query strings can carry addresses (``/emails?to=``): mask them on the server span."""
    if not scope.get("query_string") or not span.is_recording():
        return
    attributes = getattr(span, "attributes", None) or {}
    for name in _URL_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str):
            span.set_attribute(name, scrub_text(unquote(value)))


def instrument_app(app: Any) -> None:
    """FastAPI spans, without the per-chunk ASGI send/receive spans; health and metrics skipped."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        excluded_urls="health/live,health/ready,metrics",
        exclude_spans=["receive", "send"],
        server_request_hook=_mask_url,
    )


def sql_spans_enabled() -> bool:
    """Whether ``TRIBUTARY_TRACE_SQL`` asks for a span per SQL statement."""
    value = os.environ.get(TRACE_SQL, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{TRACE_SQL}={value!r}: expected true or false")


def instrument_engine(engine: Any) -> bool:
    """SQLAlchemy spans for ``engine`` (an AsyncEngine) when ``TRIBUTARY_TRACE_SQL`` is true;
    whether it was instrumented.

    Off by default: the instrumentation starts a span for every statement, a sampled trace or
    not (about 45 µs of CPU a statement in an unsampled one, a third of a simple query).

    The instrumentation's dependency check refuses SQLAlchemy 2.1; the hooks it uses work
    there, which a test checks, so the check is skipped.
    """
    if not sql_spans_enabled():
        return False
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    SQLAlchemyInstrumentor().instrument(
        engine=engine.sync_engine, skip_dep_check=True, enable_commenter=False
    )
    return True
