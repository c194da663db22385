"""Outages pause consumption; stops and lost subscriptions charge no healthy message.

In-process and quick: the retry tiers are shortened so that, without the pause, the outage
here would send every event through them into the DLQ. The process-level versions with the
default tiers live in ``test_outages.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts.envelope import CloudEvent
from tributary.contracts.events import UserCreatedV2
from tributary.messaging import consumer as consumer_module
from tributary.messaging import headers
from tributary.messaging.bus import Bus
from tributary.messaging.testing import (
    OutcomeRecorder,
    isolated_settings,
    queue_depth,
    read_queue,
    started_bus,
)
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.nodes import PostgresNode
from tributary.testkit.waiting import eventually

from .conftest import Thing, prepared_engine
from .helpers import publish_events, queues_of, things_count, user_created

pytestmark = pytest.mark.broker

SERVICE = "pausing"


async def write_thing(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
    uow.session.add(Thing(event_id=event.id, user_id=event.data.user_id))


async def test_a_database_outage_pauses_consumption_and_dead_letters_nothing(
    postgres_node: PostgresNode, broker_url: str
) -> None:
    engine = await prepared_engine(await postgres_node.create_database("pausing"))
    # tiers of 0.2 + 0.5 s: without the pause every event would be in the DLQ within seconds
    settings = isolated_settings(broker_url, retry_tiers=(0.2, 0.5), pause_probe_max_seconds=0.5)
    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: write_thing}, settings=settings)
    events = [user_created() for _ in range(200)]
    try:
        async with started_bus(bus) as outcomes:
            await publish_events(broker_url, bus.names, events[:20])
            await outcomes.wait_for_count("processed", 20)

            await asyncio.to_thread(postgres_node.stop)
            await publish_events(broker_url, bus.names, events[20:])

            async def paused() -> bool:
                ok, reason = (await bus.health())["consumers"]
                return not ok and "database unavailable" in (reason or "")

            await eventually(paused, timeout=30, what="consumption paused")
            # stay down for several times what the tiers add up to
            await asyncio.sleep(3)
            assert outcomes.count("retried") == 0
            assert outcomes.count("dead_lettered") == 0
            await asyncio.to_thread(postgres_node.start)

            await outcomes.wait_for_count("processed", len(events), timeout=60)

            async def ready_again() -> bool:
                return all(ok for ok, _ in (await bus.health()).values())

            await eventually(ready_again, timeout=30, what="ready again")
            assert outcomes.count("dead_lettered") == 0
            assert outcomes.count("retried") == 0
            assert outcomes.count("requeued") == 0
            assert await things_count(engine) == len(events)
            assert await queue_depth(broker_url, queues_of(bus).dlq) == 0
    finally:
        await engine.dispose()


async def test_a_handler_past_its_timeout_fails_that_message_only(
    broker_url: str, tmp_path: Path
) -> None:
    engine = await prepared_engine(f"sqlite+aiosqlite:///{tmp_path / 'timeout.db'}")
    slow = user_created(user_id="usr_slowslowslow01")
    settings = isolated_settings(broker_url, handler_timeout_seconds=0.3, inprocess_retries=1)

    async def handler(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
        if event.id == slow["id"]:
            await asyncio.sleep(30)
        await write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: handler}, settings=settings)
    others = [user_created() for _ in range(20)]
    try:
        async with started_bus(bus) as outcomes:
            await publish_events(broker_url, bus.names, [*others[:10], slow, *others[10:]])
            await outcomes.wait_for_count("processed", len(others))
            await outcomes.wait_until_handled(slow["id"], "dead_lettered", timeout=30)
            [dead] = await read_queue(broker_url, queues_of(bus).dlq)
            assert dead.reason == "retries_exhausted"
            assert dead.headers[headers.EXCEPTION] == "HandlerTimeout"
            assert len(outcomes.of(slow["id"], "retried")) == len(settings.retry_tiers)
    finally:
        await engine.dispose()


async def test_a_stop_finishes_what_it_holds_instead_of_handing_it_back(
    broker_url: str, tmp_path: Path
) -> None:
    engine = await prepared_engine(f"sqlite+aiosqlite:///{tmp_path / 'stop.db'}")

    async def handler(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
        await asyncio.sleep(0.001)
        await write_thing(event, uow)

    settings = isolated_settings(broker_url, batch_max=20)
    events = [user_created() for _ in range(1500)]
    first = Bus(SERVICE, engine, handlers={UserCreatedV2: handler}, settings=settings)
    outcomes = OutcomeRecorder()
    first.listeners.append(outcomes)
    try:
        await first.start()
        await publish_events(broker_url, first.names, events)
        await outcomes.wait_for_count("processed", 300)
        await first.stop()  # mid-stream, with a full prefetch in hand
        handled = outcomes.count("processed")
        assert outcomes.count("requeued") == 0
        assert handled < len(events)  # the stop really was mid-stream
        waiting = await queue_depth(broker_url, queues_of(first).work)
        assert handled + waiting == len(events)
        second = Bus(SERVICE, engine, handlers={UserCreatedV2: handler}, settings=settings)
        async with started_bus(second) as rest:
            await rest.wait_for_count("processed", waiting, timeout=60)
            assert rest.count("duplicate") == 0  # nothing came back that had been handled
        assert await things_count(engine) == len(events)
    finally:
        await engine.dispose()


async def test_a_lost_subscription_is_registered_again(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumer_module, "_WATCH_SECONDS", 0.2)
    engine = await prepared_engine(f"sqlite+aiosqlite:///{tmp_path / 'lost.db'}")
    settings = isolated_settings(broker_url)
    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: write_thing}, settings=settings)
    try:
        async with started_bus(bus) as outcomes:
            [consumer] = bus.consumers
            # as if the connection dropped between a cancel and the consume that follows it
            queue, tag = consumer._queue, consumer._tag
            assert queue is not None
            assert tag is not None
            await queue.cancel(tag)
            late = user_created(event_id=str(uuid.uuid4()))
            await publish_events(broker_url, bus.names, [late])
            await outcomes.wait_until_handled(late["id"], "processed", timeout=20)
            assert await consumer.health() == (True, None)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_data_the_database_refuses_is_dead_lettered_at_once(
    engine: AsyncEngine, broker_url: str
) -> None:
    """SQLSTATE class 22 (here a NUL in a text column) is the message's fault, and final."""
    bad = user_created()

    async def handler(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
        user_id = "usr\x00" if event.id == bad["id"] else event.data.user_id
        uow.session.add(Thing(event_id=event.id, user_id=user_id))

    bus = Bus(
        SERVICE, engine, handlers={UserCreatedV2: handler}, settings=isolated_settings(broker_url)
    )
    good = [user_created() for _ in range(5)]
    async with started_bus(bus) as outcomes:
        await publish_events(broker_url, bus.names, [*good, bad])
        await outcomes.wait_until_handled(bad["id"], "dead_lettered")
        await outcomes.wait_for_count("processed", len(good))
        [dead] = await read_queue(broker_url, queues_of(bus).dlq)
        assert dead.reason == "handler_error"
        assert outcomes.of(bad["id"], "retried") == []
        assert outcomes.count("requeued") == 0
