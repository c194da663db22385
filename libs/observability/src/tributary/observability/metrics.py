"""Prometheus metrics of a service: ``GET /metrics``.

Counters and histograms are fed by the consumer's outcome records; the relay's counters follow
its stats and its gauges (outbox waiting, oldest age, parked, last publish) are read when scraped,
as is the DLQ depth; the process's own CPU, memory and file descriptors (``process_*``) too.
One registry per app, so several apps can live in one process (tests).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from tributary.messaging.bus import Bus
from tributary.messaging.consumer import OutcomeRecord
from tributary.observability.relay_metrics import RelayMetrics

log = logging.getLogger("tributary.observability")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_AGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class ServiceMetrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_cpu_seconds_total, process_resident_memory_bytes...: CPU and RSS per service
        ProcessCollector(registry=r)
        self.relay = RelayMetrics(r, service)
        self.consumed = Counter(
            "tributary_events_consumed",
            "Deliveries by outcome: processed, duplicate, retried, dead_lettered, requeued, "
            "replayed",
            ["service", "consumer", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "tributary_dead_letters",
            "Deliveries dead-lettered by the runtime, by reason (each also announced as a "
            "message.dead_lettered event)",
            ["service", "consumer", "reason"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "tributary_handler_duration_seconds",
            "Handler run time",
            ["service", "consumer", "type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backlog_seconds = Histogram(
            "tributary_event_backlog_age_seconds",
            "Age of an event (its time) when its handling started",
            ["service", "consumer"],
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.paused = Gauge(
            "tributary_consumer_paused",
            "1 while an outage (database or broker) pauses the consumer",
            ["service", "consumer"],
            registry=r,
        )
        self.dlq_depth = Gauge(
            "tributary_dlq_depth", "Messages waiting in a dead-letter queue", ["queue"], registry=r
        )

    def record(self, outcome: OutcomeRecord) -> None:
        """An ``OutcomeListener``: add it to ``bus.listeners``."""
        labels = (self.service, outcome.consumer)
        self.consumed.labels(*labels, outcome.outcome).inc()
        if outcome.outcome == "dead_lettered":
            self.dead_letters.labels(*labels, outcome.reason or "unknown").inc()
        if outcome.replay:
            self.consumed.labels(*labels, "replayed").inc()
        if outcome.duration is not None:
            self.handler_seconds.labels(*labels, outcome.event_type or "").observe(outcome.duration)
        if outcome.backlog is not None:
            self.backlog_seconds.labels(*labels).observe(outcome.backlog)

    async def refresh(self, bus: Bus) -> None:
        """Bring the read-on-scrape figures up to date."""
        if bus.relay is not None:
            await self.relay.refresh(bus.relay)
        for consumer in bus.consumers:
            self.paused.labels(self.service, consumer.queues.consumer).set(
                1 if consumer.paused else 0
            )
        try:
            for queue, depth in (await bus.queue_depths(bus.dead_letter_queues)).items():
                self.dlq_depth.labels(queue).set(depth)
        except Exception as exc:
            log.warning("metrics: DLQ depth not readable: %s", type(exc).__name__)

    def router(self) -> APIRouter:
        router = APIRouter(tags=["observability"])

        @router.get("/metrics", include_in_schema=True, response_class=Response)
        async def metrics(request: Request) -> Response:
            """Prometheus text exposition."""
            bus: Bus | None = getattr(request.app.state, "bus", None)
            if bus is not None:
                await self.refresh(bus)
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return router
