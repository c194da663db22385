"""Topology against the real broker: queue arguments, delivery limit, idempotence, retry routing."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelPreconditionFailed
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts.envelope import CloudEvent
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.errors import TopologyMismatch
from tributary.messaging.testing import isolated_settings, queue_depth, read_queue, started_bus
from tributary.messaging.topology import _mismatch, migrating
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.infra import Found

from .helpers import publish_events, queues_of, user_created

EngineFactory = Callable[[str], Awaitable[AsyncEngine]]


async def ignore(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
    """A handler that accepts everything (only the topology it makes the bus declare matters)."""


@pytest.fixture
async def sqlite_engines(tmp_path: Path) -> AsyncIterator[EngineFactory]:
    """Fresh SQLite databases, one per service: each service keeps its own inbox."""
    made: list[AsyncEngine] = []

    async def make(name: str) -> AsyncEngine:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / name}.db")
        await create_runtime_tables(engine)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.dispose()


async def rabbitmqctl(rabbitmq: Found, *args: str) -> list[dict[str, Any]]:
    """Run ``rabbitmqctl <args> -p / --formatter json`` against the test broker."""
    exe = shutil.which("rabbitmqctl")
    if exe is None or not rabbitmq.controllable:
        pytest.skip(
            "rabbitmqctl is not installed or cannot reach the test broker "
            f"({rabbitmq.how}): queue arguments cannot be read back"
        )
    proc = await asyncio.create_subprocess_exec(
        exe,
        *args,
        "-p",
        "/",
        "--formatter",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    listing: list[dict[str, Any]] = json.loads(out)
    return listing


def arguments_of(listing: list[dict[str, Any]], queue: str) -> dict[str, Any]:
    """``[[name, type, value], ...]`` as rabbitmqctl prints them, as ``{name: value}``."""
    [row] = [row for row in listing if row["name"] == queue]
    return {name: value for name, _type, value in row["arguments"]}


def bindings_to(listing: list[dict[str, Any]], queue: str) -> set[tuple[str, str]]:
    """``(source exchange, routing key)`` of every binding to ``queue``."""
    return {
        (row["source_name"], row["routing_key"])
        for row in listing
        if row["destination_name"] == queue and row["destination_kind"] == "queue"
    }


async def test_declared_queues_read_back_with_safe_dead_lettering_arguments(
    rabbitmq: Found, sqlite_engines: EngineFactory
) -> None:
    settings = isolated_settings(rabbitmq.url, delivery_limit=4)
    bus = Bus(
        "onboarding",
        await sqlite_engines("onboarding"),
        handlers={UserCreatedV2: ignore},
        settings=settings,
    )
    async with started_bus(bus, consume=False):
        qs = queues_of(bus)
        queues = await rabbitmqctl(rabbitmq, "list_queues", "name", "arguments")
        bindings = await rabbitmqctl(
            rabbitmq,
            "list_bindings",
            "source_name",
            "destination_name",
            "destination_kind",
            "routing_key",
        )

    assert arguments_of(queues, qs.work) == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-dead-letter-exchange": f"{settings.name_prefix}tributary.dlx",
        "x-dead-letter-routing-key": qs.dlq,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert len(qs.retries) == 2
    for retry_queue, ttl_ms in zip(qs.retries, (200, 500), strict=True):
        assert arguments_of(queues, retry_queue) == {
            "x-queue-type": "quorum",
            "x-message-ttl": ttl_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": qs.work,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    assert arguments_of(queues, qs.dlq) == {"x-queue-type": "quorum"}

    assert (bus.names.dlx, qs.dlq) in bindings_to(bindings, qs.dlq)
    assert bindings_to(bindings, qs.work) == {("", qs.work), (bus.names.exchange, "user.created.*")}
    for retry_queue in qs.retries:
        # reachable only by name: nothing published on the topic exchange can land here
        assert bindings_to(bindings, retry_queue) == {("", retry_queue)}


async def test_a_message_requeued_past_the_delivery_limit_is_dead_lettered_to_the_dlq(
    broker_url: str, sqlite_engines: EngineFactory
) -> None:
    bus = Bus(
        "crashloop",
        await sqlite_engines("crashloop"),
        handlers={UserCreatedV2: ignore},
        settings=isolated_settings(broker_url, delivery_limit=2),
    )
    async with started_bus(bus, consume=False):
        qs = queues_of(bus)
        event = user_created()
        deliveries: list[AbstractIncomingMessage] = []

        async def crash(message: AbstractIncomingMessage) -> None:
            deliveries.append(message)
            await message.nack(requeue=True)

        connection = await aio_pika.connect(broker_url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1)
            work = await channel.get_queue(qs.work, ensure=False)
            await work.consume(crash)
            await publish_events(broker_url, bus.names, [event])
            [dead] = await read_queue(broker_url, qs.dlq, expect=1)
        finally:
            await connection.close()
        left_in_work_queue = await queue_depth(broker_url, qs.work)

    assert [m.message_id for m in deliveries] == [event["id"]] * 3  # delivery limit 2: N+1
    assert dead.message_id == event["id"]
    assert dead.reason == "delivery_limit"
    [death, *_] = dead.headers["x-death"]
    assert death["queue"] == qs.work
    assert left_in_work_queue == 0


async def test_a_second_instance_with_the_same_settings_starts_on_the_existing_topology(
    broker_url: str, sqlite_engines: EngineFactory
) -> None:
    settings = isolated_settings(broker_url)
    engine = await sqlite_engines("billing")
    first = Bus("billing", engine, handlers={UserCreatedV2: ignore}, settings=settings)
    second = Bus("billing", engine, handlers={UserCreatedV2: ignore}, settings=settings)
    async with (
        started_bus(first),
        started_bus(second, owns_topology=False),
    ):
        assert first.consuming
        assert second.consuming


async def test_an_instance_with_another_delivery_limit_fails_to_start_naming_queue_and_argument(
    broker_url: str, sqlite_engines: EngineFactory
) -> None:
    settings = isolated_settings(broker_url, delivery_limit=5)
    engine = await sqlite_engines("billing")
    running = Bus("billing", engine, handlers={UserCreatedV2: ignore}, settings=settings)
    misconfigured = Bus(
        "billing",
        engine,
        handlers={UserCreatedV2: ignore},
        settings=isolated_settings(broker_url, name_prefix=settings.name_prefix, delivery_limit=7),
    )
    async with started_bus(running, consume=False):
        try:
            with pytest.raises(TopologyMismatch) as mismatch:
                await misconfigured.start()
        finally:
            await misconfigured.stop()
        assert running.connected

    message = str(mismatch.value)
    assert queues_of(running).work in message
    assert "x-delivery-limit" in message
    assert "it has 5, this service declares 7" in message
    # the supported way to change it, not "delete the queue"
    assert "eventctl queue migrate billing" in message


async def test_a_service_does_not_start_while_a_migration_of_its_queues_is_unfinished(
    broker_url: str, sqlite_engines: EngineFactory
) -> None:
    settings = isolated_settings(broker_url)
    bus = Bus(
        "billing",
        await sqlite_engines("billing"),
        handlers={UserCreatedV2: ignore},
        settings=settings,
    )
    holding = migrating(bus.names.service_queues("billing", 0).work)
    connection = await aio_pika.connect(broker_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(holding, durable=True, arguments={"x-queue-type": "quorum"})
        try:
            with pytest.raises(TopologyMismatch, match="eventctl queue migrate billing"):
                await bus.start()
        finally:
            await bus.stop()
            await channel.queue_delete(holding)
        # once the migration is over, it starts
        async with started_bus(bus, consume=False):
            assert bus.connected
    finally:
        await connection.close()


async def test_a_retried_event_comes_back_only_to_the_service_that_failed(
    broker_url: str, sqlite_engines: EngineFactory
) -> None:
    shared = isolated_settings(broker_url)
    # one in-process attempt: the first failure goes through retry tier 1
    flaky_settings = isolated_settings(
        broker_url, name_prefix=shared.name_prefix, inprocess_retries=1
    )
    event = user_created()
    sentinel = user_created()
    flaky_calls: list[str] = []
    steady_calls: list[str] = []

    async def fails_once_on_the_event(event_: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
        flaky_calls.append(event_.id)
        if event_.id == event["id"] and flaky_calls.count(event_.id) == 1:
            raise ConnectionError("search index briefly unavailable")

    async def succeeds(event_: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
        steady_calls.append(event_.id)

    flaky = Bus(
        "flaky",
        await sqlite_engines("flaky"),
        handlers={UserCreatedV2: fails_once_on_the_event},
        settings=flaky_settings,
    )
    steady = Bus(
        "steady",
        await sqlite_engines("steady"),
        handlers={UserCreatedV2: succeeds},
        settings=shared,
    )
    async with started_bus(flaky) as flaky_outcomes, started_bus(steady) as steady_outcomes:
        await publish_events(broker_url, flaky.names, [event])
        await flaky_outcomes.wait_until_handled(event["id"], "processed")
        # a copy wrongly routed to steady would sit in its queue before the sentinel
        await publish_events(broker_url, steady.names, [sentinel])
        await steady_outcomes.wait_until_handled(sentinel["id"])

    assert [r.outcome for r in flaky_outcomes.of(event["id"])] == ["retried", "processed"]
    assert [r.outcome for r in steady_outcomes.of(event["id"])] == ["processed"]
    assert steady_calls == [event["id"], sentinel["id"]]


@pytest.mark.parametrize(
    ("received", "current", "shown"),
    [
        ("'7'", "'5'", "it has 5, this service declares 7"),
        ("none", "the value '5' of type 'byte'", "it has 5, this service declares none"),
        ("the value '200' of type 'short'", "none", "it has none, this service declares 200"),
    ],
)
def test_a_mismatch_names_both_values_in_each_way_the_broker_words_them(
    received: str, current: str, shown: str
) -> None:
    error = ChannelPreconditionFailed(
        "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'a.retry.1' in "
        f"vhost '/': received {received} but current is {current}"
    )
    message = str(_mismatch(error, "queue", "a.retry.1", "a"))
    assert shown in message
    assert "'x-message-ttl'" in message
    assert "eventctl queue migrate a" in message


@given(st.text(max_size=300))
def test_any_refusal_text_becomes_a_mismatch_naming_the_queue(text: str) -> None:
    message = str(_mismatch(ChannelPreconditionFailed(text), "queue", "q.events", "q"))
    assert "q.events" in message
