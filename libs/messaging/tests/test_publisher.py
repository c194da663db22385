"""The publisher's failures; a private RabbitMQ node where the fault is its memory alarm.

A node over its memory watermark blocks publishing connections: the publish goes out, no
confirm comes back. The publisher must give up after its timeout with an
``InfrastructureError`` instead of waiting for ever, and the message may still arrive later.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest

from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.errors import InfrastructureError, Unroutable
from tributary.messaging.publisher import Publisher
from tributary.messaging.relay import RelayPolicy
from tributary.messaging.testing import isolated_settings
from tributary.messaging.topology import Names
from tributary.testkit.nodes import RabbitNode
from tributary.testkit.waiting import eventually

from .relay_support import Capture, commit_events, new_user, relay_with, supervised

QUEUE = "publisher-test"


def message(n: int) -> aio_pika.Message:
    return aio_pika.Message(
        f"{n}".encode(), message_id=f"m-{n}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )


async def test_a_publish_without_a_confirm_fails_after_the_timeout_as_a_broker_failure(
    rabbit_node: RabbitNode,
) -> None:
    connection = await aio_pika.connect(rabbit_node.url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(QUEUE, durable=True)
        publisher = Publisher(connection, timeout=1.0)
        await publisher.open()
        await publisher.publish("", QUEUE, message(1))  # a healthy node confirms

        await asyncio.to_thread(rabbit_node.set_memory_watermark, 0.000001)
        try:
            with pytest.raises(InfrastructureError) as failure:
                await publisher.publish("", QUEUE, message(2))
        finally:
            await asyncio.to_thread(rabbit_node.reset_memory_watermark)

        assert failure.value.component == "broker"
        assert "no publisher confirm within 1 s" in str(failure.value)
        await publisher.publish("", QUEUE, message(3))  # the same channel works again

        def ready() -> int:
            return rabbit_node.queues()[QUEUE]["messages"]

        async def all_three() -> bool:
            return await asyncio.to_thread(ready) == 3

        # the timed-out publish was delivered after all: why consumers deduplicate
        await eventually(all_three, what="the timed-out message delivered after the alarm")
    finally:
        await connection.close()


async def test_a_closed_channel_and_a_return_are_told_apart(broker_url: str) -> None:
    connection = await aio_pika.connect(broker_url)
    try:
        publisher = Publisher(connection, timeout=5.0)
        await publisher.open()
        with pytest.raises(Unroutable):
            await publisher.publish("amq.topic", "nobody.listens", message(1))
        await publisher.close()

        with pytest.raises(InfrastructureError) as failure:
            await publisher.publish("amq.topic", "nobody.listens", message(2))
    finally:
        await connection.close()

    assert failure.value.component == "broker"
    assert "ChannelInvalidStateError" in str(failure.value)


async def test_a_relay_facing_a_blocked_broker_reports_its_stall_and_catches_up_after(
    rabbit_node: RabbitNode, tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    await create_runtime_tables(engine)
    settings = isolated_settings(rabbit_node.url, outbox_poll_seconds=0.2)
    connection = await aio_pika.connect(rabbit_node.url)
    policy = RelayPolicy(step_backoff_seconds=0.05, step_backoff_max_seconds=0.5, stall_seconds=1)
    reasons: list[str | None] = []
    try:
        publisher = Publisher(connection, timeout=0.5)
        await publisher.open()
        async with Capture(rabbit_node.url, Names(settings.name_prefix)) as capture:
            await asyncio.to_thread(rabbit_node.set_memory_watermark, 0.000001)
            relay = relay_with(engine, publisher, settings, policy)
            ids = await commit_events(engine, [new_user() for _ in range(20)])
            async with supervised(relay):
                try:

                    async def stalled() -> bool:
                        failed = relay.stats.step_failures["publish"] > 0  # before it awaits
                        ok, why = await relay.health()
                        reasons.append(why)
                        return failed and not ok

                    await eventually(stalled, what="readiness to report the stall")
                finally:
                    await asyncio.to_thread(rabbit_node.reset_memory_watermark)
                received = await capture.take(20, timeout=60)

                async def healthy() -> bool:
                    return await relay.health() == (True, None)

                await eventually(healthy, timeout=30)
            pending = await relay.pending()
    finally:
        await connection.close()
        await engine.dispose()

    reason = reasons[-1]
    assert reason is not None
    assert "20 rows waiting" in reason
    assert "no publisher confirm" in reason
    assert relay.stats.step_failures["publish"] >= 1
    assert set(ids) <= {m.message_id for m in received}  # duplicates allowed: ambiguous sends
    assert pending == (0, None)
