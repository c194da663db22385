"""The outbox relay's metrics: counters that follow its stats, gauges read when scraped."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge

from tributary.messaging.relay import STEPS, OutboxRelay

log = logging.getLogger("tributary.observability")


class RelayMetrics:
    """Registered in a service's registry; ``refresh(relay)`` before each exposition."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.service = service
        r, labels = registry, ["service"]
        self.published = Counter(
            "tributary_events_published", "Events published by the outbox relay", labels, registry=r
        )
        self.unroutable = Counter(
            "tributary_events_unroutable",
            "Outbox publishes returned by the broker (kept in the outbox)",
            labels,
            registry=r,
        )
        self.refused = Counter(
            "tributary_events_refused",
            "Outbox publishes nacked by the broker or failed for a reason of the row",
            labels,
            registry=r,
        )
        self.parked_rows = Counter(
            "tributary_outbox_parked_rows",
            "Outbox rows parked after their bounded attempts",
            labels,
            registry=r,
        )
        self.step_failures = Counter(
            "tributary_relay_step_failures",
            "Failed relay steps (claim, publish, mark, purge); each is retried with backoff",
            ["service", "step"],
            registry=r,
        )
        self.restarts = Counter(
            "tributary_relay_restarts",
            "Relay loops that ended unexpectedly and were restarted",
            labels,
            registry=r,
        )
        self.waiting = Gauge(
            "tributary_outbox_pending",
            "Outbox rows not yet published, parked rows and scheduled rows not due yet excluded",
            labels,
            registry=r,
        )
        self.oldest = Gauge(
            "tributary_outbox_oldest_age_seconds",
            "Age of the oldest unpublished, unparked outbox row, a scheduled row counted from "
            "its due time (0 when none)",
            labels,
            registry=r,
        )
        self.scheduled = Gauge(
            "tributary_outbox_scheduled",
            "Outbox rows scheduled for later (deliver_at still to come)",
            labels,
            registry=r,
        )
        self.overdue = Gauge(
            "tributary_outbox_overdue_seconds",
            "How long ago the oldest due but unpublished scheduled outbox row came due "
            "(0 when none)",
            labels,
            registry=r,
        )
        self.parked = Gauge("tributary_outbox_parked", "Outbox rows parked now", labels, registry=r)
        self.last_publish = Gauge(
            "tributary_outbox_last_publish_timestamp_seconds",
            "Unix time of the relay's last confirmed publish (0 before the first)",
            labels,
            registry=r,
        )
        for step in STEPS:  # every step shows, at 0 until it fails
            self.step_failures.labels(service, step)
        self._relay: OutboxRelay | None = None
        self._seen: dict[str, int] = {}

    def _advance(self, counter: Counter, key: str, total: int, *labels: str) -> None:
        """Add what ``total`` grew by since the last scrape."""
        counter.labels(self.service, *labels).inc(max(total - self._seen.get(key, 0), 0))
        self._seen[key] = total

    async def refresh(self, relay: OutboxRelay) -> None:
        if relay is not self._relay:  # a new relay (the bus restarted) counts from 0
            self._relay, self._seen = relay, {}
        stats = relay.stats
        self._advance(self.published, "published", stats.published)
        self._advance(self.unroutable, "unroutable", stats.unroutable)
        self._advance(self.refused, "refused", stats.refused)
        self._advance(self.parked_rows, "parked", stats.parked)
        self._advance(self.restarts, "restarts", stats.restarts)
        for step in STEPS:
            self._advance(self.step_failures, f"step:{step}", stats.step_failures[step], step)
        self.last_publish.labels(self.service).set(stats.last_publish_at or 0.0)
        try:
            gauges = await relay.gauges()
        except Exception as exc:
            log.warning("metrics: outbox not readable: %s", type(exc).__name__)
            return
        self.waiting.labels(self.service).set(gauges.waiting)
        self.oldest.labels(self.service).set(gauges.oldest_waiting_age or 0.0)
        self.parked.labels(self.service).set(gauges.parked)
        self.scheduled.labels(self.service).set(gauges.scheduled)
        self.overdue.labels(self.service).set(gauges.overdue_seconds)
