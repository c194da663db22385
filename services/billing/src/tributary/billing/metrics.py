"""Billing's own metrics, served by ``GET /metrics`` beside the runtime's."""

from __future__ import annotations

from prometheus_client import Counter
from prometheus_client.registry import Collector


class BillingMetrics:
    def __init__(self) -> None:
        self.webhooks = Counter(
            "tributary_billing_webhooks",
            "Payment webhooks by outcome: accepted, duplicate, unmatched, ignored, or why refused "
            "(forged, stale, malformed, oversized, invalid_payload, replay_conflict)",
            ["outcome"],
            registry=None,
        )
        self.conflicts = Counter(
            "tributary_billing_concurrency_conflicts",
            "Appends that found their subscription moved on: retried, or refused (409)",
            ["command", "outcome"],
            registry=None,
        )
        self.unmatched = Counter(
            "tributary_billing_unmatched_messages",
            "Messages that matched no subscription (logged, acknowledged), by type and reason",
            ["type", "reason"],
            registry=None,
        )
        self.appended = Counter(
            "tributary_billing_events_appended",
            "Domain events appended to the event store, by type",
            ["type"],
            registry=None,
        )

        self.saga_steps = Counter(
            "tributary_billing_saga_steps",
            "Saga steps handled (activation_timeout, refund, activation_rejected) by outcome: "
            "compensating (compensation started), refunded, no_change (not needed any more), "
            "suppressed (a replay), refused (the provider said no: dead-lettered), unavailable "
            "(the provider did not answer: retried)",
            ["step", "outcome"],
            registry=None,
        )

    @property
    def collectors(self) -> list[Collector]:
        return [self.webhooks, self.conflicts, self.unmatched, self.appended, self.saga_steps]
