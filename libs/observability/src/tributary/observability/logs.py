"""JSON log lines on stdout, with the message context and PII masked."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from tributary.contracts.pii import scrub_text
from tributary.messaging import context

# fields a log call may pass with ``extra=``; anything else is dropped (it might be PII)
EXTRA_FIELDS = (
    "correlation_id",
    "event_id",
    "event_type",
    "consumer",
    "attempt",
    "outcome",
    "reason",
    "queue",
)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ctx = context.current()
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": scrub_text(record.getMessage()),
        }
        if ctx.correlation_id:
            out["correlation_id"] = ctx.correlation_id
        if ctx.event_id:
            out["event_id"] = ctx.event_id
            out["event_type"] = ctx.event_type
            out["consumer"] = ctx.consumer
            out["attempt"] = ctx.attempt
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = format(span.trace_id, "032x")
            out["span_id"] = format(span.span_id, "016x")
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["error"] = scrub_text(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    """Route every logger (uvicorn's too) to one JSON handler on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("aiormq").setLevel("WARNING")
    logging.getLogger("aio_pika").setLevel("WARNING")
