"""The outbox relay against the real broker, on SQLite and PostgreSQL.

What the relay published is read from a private queue bound to the test's exchange, exactly as
any consumer would see it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts.envelope import CloudEvent, parse_event
from tributary.contracts.events import Payload
from tributary.messaging import context
from tributary.messaging.bus import Bus
from tributary.messaging.db import utcnow
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.publisher import Publisher
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import delete_prefixed, isolated_settings, started_bus
from tributary.messaging.topology import Names, declare_exchanges
from tributary.testkit.waiting import eventually

from .relay_support import (
    SERVICE,
    Capture,
    RelayFetches,
    commit_events,
    insert_rows,
    new_user,
    outbox_rows,
    raw_row,
    relay_with,
    row_of,
    unix_seconds,
)


@pytest.fixture
def settings(broker_url: str) -> MessagingSettings:
    return isolated_settings(broker_url)


@pytest.fixture
async def connection(broker_url: str) -> AsyncIterator[AbstractConnection]:
    conn = await aio_pika.connect(broker_url)
    yield conn
    await conn.close()


@pytest.fixture
async def exchanges(broker_url: str, settings: MessagingSettings) -> AsyncIterator[Names]:
    """The test's prefixed exchanges, deleted afterwards (for relays built without a bus)."""
    names = Names(settings.name_prefix)
    yield names
    await delete_prefixed(broker_url, names, [])


async def test_published_message_properties_mirror_the_envelope(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    bus = Bus(SERVICE, engine, settings=settings)
    trace_id = int(uuid.uuid4().hex, 16)
    parent = SpanContext(
        trace_id=trace_id,
        span_id=int(uuid.uuid4().hex[:16], 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    async with Capture(broker_url, bus.names) as capture, started_bus(bus, consume=False):
        with context.correlated("req-7f3a"), trace.use_span(NonRecordingSpan(parent)):
            async with bus.unit_of_work() as uow:
                event: CloudEvent[Payload] = uow.outbox.add(new_user())
                await uow.commit()
        [message] = await capture.take(1)
    row = await row_of(engine, event.id)

    assert message.message_id == event.id
    assert message.type == "com.tributary.user.created.v2" == event.type
    assert message.correlation_id == "req-7f3a" == event.correlationid
    assert message.app_id == SERVICE
    assert message.content_type == "application/cloudevents+json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.routing_key == "user.created.v2"
    assert message.timestamp is not None
    assert unix_seconds(message.timestamp) == unix_seconds(row.created_at)
    assert parse_event(message.body).id == event.id
    traceparent = str((message.headers or {})["traceparent"])
    assert traceparent.startswith(f"00-{trace_id:032x}-")
    assert event.traceparent is not None
    assert event.traceparent.startswith(f"00-{trace_id:032x}-")


async def test_five_hundred_events_committed_together_arrive_in_commit_order(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    bus = Bus(SERVICE, engine, settings=settings)
    async with Capture(broker_url, bus.names) as capture, started_bus(bus, consume=False):
        async with bus.unit_of_work() as uow:
            for _ in range(500):
                uow.outbox.add(new_user())
            await uow.commit()
        received = await capture.take(500, timeout=60)
    in_seq_order = [row.event_id for row in await outbox_rows(engine)]

    assert len(in_seq_order) == 500
    assert [m.message_id for m in received] == in_seq_order


async def test_an_unroutable_row_stays_pending_without_blocking_the_rows_after_it(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    bus = Bus(SERVICE, engine, settings=settings)
    orphan = raw_row("nobody.listens.v1")
    async with (
        Capture(broker_url, bus.names, ["user.created.*"]) as capture,
        started_bus(bus, consume=False),
    ):
        async with bus.unit_of_work() as uow:
            before = uow.outbox.add(new_user())
            uow.session.add(orphan)
            after = uow.outbox.add(new_user())
            await uow.commit()
        received = await capture.take(2)

        async def settled() -> bool:
            rows = {r.event_id: r for r in await outbox_rows(engine)}
            return (
                rows[orphan.event_id].attempts >= 1
                and rows[before.id].published_at is not None
                and rows[after.id].published_at is not None
            )

        await eventually(settled)
        assert bus.relay is not None
        unroutable = bus.relay.stats.unroutable
    rows = {r.event_id: r for r in await outbox_rows(engine)}

    in_seq_order = list(rows)
    assert in_seq_order == [before.id, orphan.event_id, after.id]
    assert [m.message_id for m in received] == [before.id, after.id]
    for published in (rows[before.id], rows[after.id]):
        assert published.published_at is not None
        assert published.published_at >= published.created_at
    stuck = rows[orphan.event_id]
    assert stuck.published_at is None
    assert stuck.attempts >= 1
    assert stuck.last_error is not None
    assert "no queue bound" in stuck.last_error
    assert unroutable >= 1


async def test_a_row_the_broker_nacks_stays_pending_and_is_charged_an_attempt(
    engine: AsyncEngine,
    broker_url: str,
    settings: MessagingSettings,
    connection: AbstractConnection,
    exchanges: Names,
) -> None:
    await declare_exchanges(connection, exchanges)
    channel = await connection.channel()
    # a full queue that refuses new messages: the broker answers the publish with a nack
    full = await channel.declare_queue(
        "", exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await full.bind(exchanges.exchange, routing_key="#")
    publisher = Publisher(connection)
    await publisher.open()
    [event_id] = await commit_events(engine, [new_user()])

    relay = relay_with(engine, publisher, settings)
    assert await relay.drain_once() == 0  # a refusal of this row, not an outage: no raise

    row = await row_of(engine, event_id)
    assert row.published_at is None
    assert row.attempts == 1
    assert row.next_attempt_at is not None
    assert "nacked" in (row.last_error or "")
    assert relay.stats.refused == 1
    await publisher.close()


async def test_a_commit_wakes_the_idle_relay_long_before_its_next_poll(
    engine: AsyncEngine, broker_url: str
) -> None:
    bus = Bus(SERVICE, engine, settings=isolated_settings(broker_url, outbox_poll_seconds=30))
    published: list[str] = []
    with RelayFetches(engine) as fetches:
        async with Capture(broker_url, bus.names) as capture, started_bus(bus, consume=False):
            await fetches.wait_for(1)  # the start-up fetch found nothing: idle for 30 s
            for n in (1, 2):
                seen = fetches.count
                async with bus.unit_of_work() as uow:
                    published.append(uow.outbox.add(new_user()).id)
                    await uow.commit()
                received = await capture.take(n, timeout=5)  # < the 30 s poll interval
                await fetches.wait_for(seen + 1)  # the fetch that found the row

    assert [m.message_id for m in received] == published


async def test_purge_deletes_only_rows_published_before_the_replay_window(
    engine: AsyncEngine, broker_url: str, connection: AbstractConnection
) -> None:
    settings = isolated_settings(broker_url, outbox_replay_window_hours=1)
    relay = relay_with(engine, Publisher(connection), settings)
    now = utcnow()
    expired = raw_row(created_at=now - timedelta(hours=3), published_at=now - timedelta(hours=2))
    recent = raw_row(created_at=now - timedelta(hours=3), published_at=now - timedelta(minutes=30))
    old_pending = raw_row(created_at=now - timedelta(hours=3))
    fresh_pending = raw_row()
    await insert_rows(engine, [expired, recent, old_pending, fresh_pending])

    assert await relay.purge() == (1, 0)

    remaining = {r.event_id for r in await outbox_rows(engine)}
    assert remaining == {recent.event_id, old_pending.event_id, fresh_pending.event_id}
    assert relay.stats.purged == 1


async def test_pending_reports_how_many_rows_wait_and_the_age_of_the_oldest(
    engine: AsyncEngine, settings: MessagingSettings, connection: AbstractConnection
) -> None:
    relay = relay_with(engine, Publisher(connection), settings)
    assert await relay.pending() == (0, None)

    now = utcnow()
    await insert_rows(
        engine,
        [
            raw_row(created_at=now - timedelta(hours=1), published_at=now),
            raw_row(created_at=now - timedelta(seconds=120)),
            raw_row(created_at=now - timedelta(seconds=60)),
            raw_row(),
        ],
    )
    count, oldest_age = await relay.pending()

    assert count == 3
    assert oldest_age is not None
    assert 120 <= oldest_age < 3600  # the oldest pending row, not the older published one


async def test_two_relays_sharing_a_database_publish_each_event_exactly_once(
    engine: AsyncEngine, broker_url: str
) -> None:
    settings = isolated_settings(broker_url, outbox_batch=50)
    replicas = [Bus(SERVICE, engine, settings=settings) for _ in range(2)]
    names = replicas[0].names
    async with Capture(broker_url, names) as capture:
        # a backlog both replicas find at start-up and compete for
        ids = await commit_events(engine, [new_user() for _ in range(1000)])
        try:
            await asyncio.gather(*(bus.start(consume=False) for bus in replicas))
            first_relay = replicas[0].relay
            assert first_relay is not None

            async def drained() -> bool:
                return (await first_relay.pending())[0] == 0

            await eventually(drained, timeout=60)
        finally:
            for bus in replicas:
                await bus.stop()
            await delete_prefixed(broker_url, names, [])
        received = await capture.flush()

    message_ids = [m.message_id for m in received]
    assert len(message_ids) == 1000, f"{len(message_ids) - len(set(message_ids))} duplicates"
    assert set(message_ids) == set(ids)
    assert sum(bus.relay.stats.published for bus in replicas if bus.relay is not None) == 1000


async def test_a_publish_on_a_closed_channel_fails_and_a_healthy_relay_publishes_the_row_later(
    engine: AsyncEngine,
    broker_url: str,
    settings: MessagingSettings,
    connection: AbstractConnection,
    exchanges: Names,
) -> None:
    async with Capture(broker_url, exchanges) as capture:
        broken = Publisher(connection)
        await broken.open()
        await broken.close()  # as if the broker had dropped the channel
        [event_id] = await commit_events(engine, [new_user()])

        failing = relay_with(engine, broken, settings)
        with pytest.raises(InfrastructureError):
            await failing.drain_once()
        row = await row_of(engine, event_id)
        assert row.published_at is None
        assert row.attempts == 0  # an outage is not the row's fault
        assert failing.stats.step_failures["publish"] == 1

        healthy_publisher = Publisher(connection)
        await healthy_publisher.open()
        healthy = relay_with(engine, healthy_publisher, settings)
        # on SQLite the failed relay gave its lease up: the healthy one takes over at once
        assert await healthy.drain_once() == 1
        [message] = await capture.take(1)
        await healthy_publisher.close()

    assert message.message_id == event_id
    assert (await row_of(engine, event_id)).published_at is not None
