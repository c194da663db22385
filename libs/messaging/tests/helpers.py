"""Shared builders for the messaging integration tests: foreign events, a running bus, counts."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import aio_pika
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import func, select

from libs.contracts.tests.samples import sample
from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.envelope import CONTENT_TYPE
from tributary.messaging.bus import Bus
from tributary.messaging.testing import (
    started_bus,  # noqa: F401  (tests import it here)
)
from tributary.messaging.topology import Names, QueueSet

from .conftest import Thing

FOREIGN_SOURCE = "/external/test-producer"


def user_created(
    *,
    version: int = 2,
    event_id: str | None = None,
    idempotencykey: str | None = None,
    correlationid: str | None = None,
    **data: Any,
) -> dict[str, Any]:
    """A valid ``user.created.v<version>`` CloudEvent as a dict; ``data`` changes the sample."""
    routing_key = f"user.created.v{version}"
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "type": f"{NAMESPACE}.{routing_key}",
        "source": FOREIGN_SOURCE,
        "time": "2026-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": correlationid or uuid.uuid4().hex,
        "data": sample(routing_key, **data),
    }
    if idempotencykey is not None:
        event["idempotencykey"] = idempotencykey
    return event


def body_of(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def routing_key_of(event: Mapping[str, Any]) -> str:
    """``com.tributary.user.created.v2`` → ``user.created.v2``."""
    return str(event["type"]).removeprefix(f"{NAMESPACE}.")


async def publish_events(
    url: str,
    names: Names,
    events: Iterable[Mapping[str, Any]],
    *,
    headers: Mapping[str, Any] | None = None,
) -> None:
    """Publish events on the exchange as a foreign producer would, confirmed, on one channel."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(names.exchange, ensure=False)
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        body_of(event),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        content_type=CONTENT_TYPE,
                        message_id=str(event["id"]),
                        headers=dict(headers or {}),
                    ),
                    routing_key_of(event),
                    mandatory=True,
                )
                for event in events
            )
        )
    finally:
        await connection.close()


def queues_of(bus: Bus) -> QueueSet:
    """The work queue, retry tiers and DLQ of a bus that subscribes to events."""
    return bus.names.service_queues(bus.service, len(bus.settings.retry_tiers))


async def things_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(Thing))).scalar_one())
