"""Reading a DLQ message, selecting it, and the copy a replay publishes: no broker needed.

Messages are real aio-pika deliveries built the way the client builds one from a
``basic.get`` answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from aio_pika.message import IncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from tributary.eventctl.dlq import replay_copy
from tributary.eventctl.entries import DlqEntry, Selector, type_matches
from tributary.messaging import headers as h

DIED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def delivery(body: bytes = b"{}", *, headers: dict[str, Any], **properties: Any) -> IncomingMessage:
    """A DLQ message as ``basic.get`` hands it over."""
    return IncomingMessage(
        DeliveredMessage(
            delivery=Basic.GetOk(
                delivery_tag=1, exchange="tributary.dlx", routing_key="probe.dlq", message_count=0
            ),
            header=ContentHeader(
                body_size=len(body), properties=Basic.Properties(headers=headers, **properties)
            ),
            body=body,
            channel=cast(Any, None),
        )
    )


def runtime_dead_lettered(**extra: Any) -> IncomingMessage:
    return delivery(
        b'{"type":"com.tributary.user.created.v2"}',
        headers={
            h.REASON: "retries_exhausted",
            h.ERROR: "ConnectionError: database hiccup",
            h.CONSUMER: "probe",
            h.ATTEMPTS: 9,
            h.RETRIES: 2,
            h.FIRST_FAILURE: "2026-01-01T00:00:00.000Z",
            h.LAST_FAILURE: "2026-01-01T00:00:01.500Z",
            h.ROUTING_KEY: "user.created.v2",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "x-delivery-count": 3,  # the DLQ's own count: listings hand messages back
            **extra,
        },
        message_id="evt-1",
        correlation_id="corr-1",
        content_type="application/cloudevents+json",
        app_id="identity",
        timestamp=DIED_AT,
    )


def test_a_type_without_a_version_matches_every_version_and_nothing_longer() -> None:
    assert type_matches("user.created", "user.created.v1")
    assert type_matches("user.created", "com.tributary.user.created.v12")
    assert type_matches("com.tributary.user.created.v2", "user.created.v2")
    assert not type_matches("user.created.v1", "user.created.v2")
    assert not type_matches("user.created", "user.created_later.v1")
    assert not type_matches("user", "user.created.v1")


def test_a_runtime_dead_lettered_message_shows_its_failure_headers() -> None:
    entry = DlqEntry.of(runtime_dead_lettered())

    assert entry == DlqEntry(
        message_id="evt-1",
        type="com.tributary.user.created.v2",  # from the body: foreign producers set no type
        reason="retries_exhausted",
        consumer="probe",
        attempts=9,
        first_failure="2026-01-01T00:00:00.000Z",
        last_failure="2026-01-01T00:00:01.500Z",
        routing_key="user.created.v2",
        error="ConnectionError: database hiccup",
        correlation_id="corr-1",
    )


def test_a_broker_dead_lettered_message_is_described_by_its_x_death() -> None:
    death = {
        "reason": "delivery_limit",
        "queue": "probe.events",
        "time": DIED_AT,
        "count": 1,
        "exchange": "tributary.events",
        "routing-keys": ["user.created.v2"],
    }
    entry = DlqEntry.of(delivery(b"not json", headers={"x-death": [death]}, message_id="m"))

    assert (entry.reason, entry.consumer, entry.routing_key) == (
        "delivery_limit",
        "probe.events",
        "user.created.v2",
    )
    assert entry.first_failure == entry.last_failure == DIED_AT.isoformat()
    assert (entry.type, entry.attempts, entry.error) == (None, None, None)


def test_every_filter_given_must_match() -> None:
    entry = DlqEntry.of(runtime_dead_lettered())

    assert Selector.of().matches(entry)
    assert Selector.of(["retries_exhausted"], ["user.created"], ["evt-1", "evt-2"]).matches(entry)
    assert not Selector.of(["handler_error"]).matches(entry)
    assert not Selector.of(types=["workspace.created"]).matches(entry)
    assert not Selector.of(["retries_exhausted"], ids=["evt-2"]).matches(entry)


def test_a_replay_copy_starts_afresh_but_keeps_the_original_message() -> None:
    copy = replay_copy(
        runtime_dead_lettered(**{"x-death": [{"reason": "expired"}], "x-first-death-queue": "q"})
    )

    assert copy.headers == {
        h.ROUTING_KEY: "user.created.v2",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    assert copy.body == b'{"type":"com.tributary.user.created.v2"}'
    assert (copy.message_id, copy.correlation_id, copy.app_id) == ("evt-1", "corr-1", "identity")
    assert copy.content_type == "application/cloudevents+json"
    assert copy.timestamp == DIED_AT
    assert copy.delivery_mode == 2


def test_a_replay_copy_of_a_broker_dead_lettered_message_learns_its_routing_key() -> None:
    death = {
        "reason": "delivery_limit",
        "queue": "probe.events",
        "routing-keys": ["user.created.v1"],
    }

    copy = replay_copy(delivery(headers={"x-death": [death], "x-delivery-count": 11}))

    assert copy.headers == {h.ROUTING_KEY: "user.created.v1"}
