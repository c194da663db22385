"""The relay's metrics: counters follow its stats, gauges come from its outbox when scraped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.messaging.db import (
    OutboxRow,
    create_engine,
    create_runtime_tables,
    session_factory,
    utcnow,
)
from tributary.messaging.publisher import Publisher
from tributary.messaging.relay import OutboxRelay
from tributary.messaging.testing import isolated_settings
from tributary.messaging.topology import Names
from tributary.observability.relay_metrics import RelayMetrics
from tributary.testkit.infra import Found

from .test_metrics import _samples

SERVICE = {("service", "obs")}


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'obs.db'}")
    await create_runtime_tables(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def relay(engine: AsyncEngine, rabbitmq: Found) -> AsyncIterator[OutboxRelay]:
    settings = isolated_settings(rabbitmq.url)
    connection = await aio_pika.connect(rabbitmq.url)
    yield OutboxRelay(
        engine,
        Publisher(connection),
        service="obs",
        names=Names(settings.name_prefix),
        settings=settings,
    )
    await connection.close()


def row(
    n: int,
    *,
    age: float = 0,
    parked: bool = False,
    published: bool = False,
    due_in: float | None = None,
) -> OutboxRow:
    now = utcnow()
    return OutboxRow(
        event_id=f"e-{n}",
        routing_key="user.created.v2",
        body=b"{}",
        created_at=now - timedelta(seconds=age),
        parked_at=now if parked else None,
        published_at=now if published else None,
        deliver_at=None if due_in is None else now + timedelta(seconds=due_in),
    )


def value(text: str, name: str, **labels: str) -> float:
    return _samples(text)[(name, frozenset(SERVICE | set(labels.items())))]


async def test_the_relay_metrics_show_waiting_parked_failures_restarts_and_last_publish(
    engine: AsyncEngine, relay: OutboxRelay
) -> None:
    async with session_factory(engine)() as session, session.begin():
        session.add_all([row(1, age=120), row(2), row(3, parked=True), row(4, published=True)])
    registry = CollectorRegistry()
    metrics = RelayMetrics(registry, "obs")
    stats = relay.stats
    stats.published, stats.parked, stats.restarts = 5, 1, 1
    stats.step_failures["claim"] = 2
    stats.last_publish_at = 1_800_000_000.5

    await metrics.refresh(relay)
    first = generate_latest(registry).decode()
    stats.published += 3
    stats.step_failures["purge"] += 1
    await metrics.refresh(relay)
    second = generate_latest(registry).decode()

    assert value(first, "tributary_outbox_pending") == 2
    assert value(first, "tributary_outbox_oldest_age_seconds") >= 120
    assert value(first, "tributary_outbox_parked") == 1
    assert value(first, "tributary_outbox_scheduled") == 0
    assert value(first, "tributary_outbox_overdue_seconds") == 0
    assert value(first, "tributary_outbox_last_publish_timestamp_seconds") == 1_800_000_000.5
    assert value(first, "tributary_relay_restarts_total") == 1
    assert value(first, "tributary_outbox_parked_rows_total") == 1
    assert value(first, "tributary_relay_step_failures_total", step="claim") == 2
    assert value(first, "tributary_relay_step_failures_total", step="mark") == 0
    assert value(second, "tributary_events_published_total") == 8
    assert value(second, "tributary_relay_step_failures_total", step="purge") == 1


async def test_a_new_relay_after_a_bus_restart_adds_to_the_counters(
    engine: AsyncEngine, relay: OutboxRelay, rabbitmq: Found
) -> None:
    registry = CollectorRegistry()
    metrics = RelayMetrics(registry, "obs")
    relay.stats.published = 10
    await metrics.refresh(relay)
    restarted = OutboxRelay(
        engine,
        relay._publisher,
        service="obs",
        names=relay._names,
        settings=relay._settings,
    )
    restarted.stats.published = 4

    await metrics.refresh(restarted)

    text = generate_latest(registry).decode()
    assert value(text, "tributary_events_published_total") == 14


async def test_scheduled_rows_show_as_scheduled_until_due_then_as_overdue_and_pending(
    engine: AsyncEngine, relay: OutboxRelay
) -> None:
    async with session_factory(engine)() as session, session.begin():
        session.add_all(
            [
                row(1, age=600, due_in=3600),  # not due yet: neither pending nor old
                row(2, age=600, due_in=86400),
                row(3, age=600, due_in=-45),  # due 45 s ago, not published yet
                row(4, age=600, due_in=-300, published=True),
            ]
        )
    registry = CollectorRegistry()
    metrics = RelayMetrics(registry, "obs")

    await metrics.refresh(relay)

    text = generate_latest(registry).decode()
    assert value(text, "tributary_outbox_scheduled") == 2
    assert 45 <= value(text, "tributary_outbox_overdue_seconds") < 45 + 60
    assert value(text, "tributary_outbox_pending") == 1
    assert 45 <= value(text, "tributary_outbox_oldest_age_seconds") < 45 + 60
