"""Confirmed, mandatory, persistent publishing with many confirms in flight."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.exceptions import PublishError

from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.envelope import CONTENT_TYPE
from tributary.messaging.errors import Unroutable


def event_message(
    body: bytes,
    *,
    event_id: str,
    routing_key: str,
    app_id: str,
    correlation_id: str | None,
    timestamp: datetime,
    headers: dict[str, Any] | None = None,
) -> aio_pika.Message:
    """AMQP properties mirror the envelope so broker tools show them."""
    return aio_pika.Message(
        body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event_id,
        type=f"{NAMESPACE}.{routing_key}",
        correlation_id=correlation_id,
        app_id=app_id,
        timestamp=timestamp,
        headers=headers or {},
    )


class Publisher:
    """One confirm channel; ``publish`` returns once the broker has confirmed the message.

    Call it from many tasks at once (``asyncio.gather``): up to ``in_flight`` confirms are
    outstanding together, which is what makes publishing fast.
    """

    def __init__(self, connection: AbstractConnection, *, in_flight: int = 256) -> None:
        self._connection = connection
        self._limit = asyncio.Semaphore(in_flight)
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}

    async def open(self) -> None:
        self._exchanges.clear()  # bound to the previous channel
        # held strongly: a robust connection restores only channels someone references
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _exchange(self, name: str) -> AbstractExchange:
        if self._channel is None:
            raise RuntimeError("Publisher.open() was not awaited")
        if name == "":
            return self._channel.default_exchange
        if (exchange := self._exchanges.get(name)) is None:
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        """Publish ``mandatory`` and wait for the confirm; :class:`Unroutable` if returned."""
        target = await self._exchange(exchange)
        async with self._limit:
            try:
                # returns the Basic.Ack; a nack raises DeliveryError, a return PublishError
                await target.publish(message, routing_key, mandatory=True)
            except PublishError as exc:
                raise Unroutable(
                    f"no queue bound to {routing_key!r} on exchange {exchange!r}"
                ) from exc
