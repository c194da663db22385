"""Confirmed, mandatory, persistent publishing with many confirms in flight.

Every publish waits for its confirm at most ``timeout`` seconds. A publish that fails for any
reason but a return (no confirm in time, a nack, the channel or connection closed) raises
:class:`~tributary.messaging.errors.InfrastructureError` with component ``"broker"``.

Such a failure is **ambiguous**: a message whose confirm timed out, or whose connection closed
before the confirm came, may still have been delivered. Callers keep the message's source (the
outbox row, the delivery in hand) until a confirm and publish it again; consumers deduplicate on
the event id, which is why both exist.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError

from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.envelope import CONTENT_TYPE
from tributary.messaging.errors import InfrastructureError, Unroutable

DEFAULT_CONFIRM_TIMEOUT = 15.0
"""Seconds; services pass ``MessagingSettings.publish_timeout_seconds``."""


class PublishRefused(InfrastructureError):
    """The broker nacked the message (a full queue with ``reject-publish``, an internal error).

    An :class:`InfrastructureError` for callers that pause on any broker failure; the relay
    tells it apart because it concerns this message's destination, so it counts toward the
    row's attempts.
    """


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

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        in_flight: int = 256,
        timeout: float = DEFAULT_CONFIRM_TIMEOUT,
    ) -> None:
        self._connection = connection
        # the user the connection authenticates as (aio-pika's default when the URL has none)
        user = getattr(getattr(connection, "url", None), "user", None)
        self.user: str = user if isinstance(user, str) and user else "guest"
        self._timeout = timeout
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
        """Publish ``mandatory`` and wait for the confirm.

        Raises :class:`Unroutable` if the broker returned the message, :class:`PublishRefused`
        on a nack and :class:`InfrastructureError` on any other failure, including no confirm
        within the timeout (the wait for a free in-flight slot counts too: the whole call is
        bounded). See the module docstring for why a failure may still have been delivered.

        The message's ``user_id`` is set to the connection's user: the broker refuses any other,
        so consumers can tell who published it (the sender check).
        """
        message.user_id = self.user
        try:
            async with asyncio.timeout(self._timeout):
                target = await self._exchange(exchange)
                async with self._limit:
                    # returns the Basic.Ack; a nack raises DeliveryError, a return PublishError
                    await target.publish(message, routing_key, mandatory=True)
        except PublishError as exc:
            raise Unroutable(f"no queue bound to {routing_key!r} on exchange {exchange!r}") from exc
        except DeliveryError as exc:
            raise PublishRefused(
                "broker", f"{routing_key!r} on exchange {exchange!r} nacked by the broker"
            ) from exc
        except TimeoutError as exc:
            raise InfrastructureError(
                "broker", f"no publisher confirm within {self._timeout:g} s (may be delivered)"
            ) from exc
        except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
            # a closed channel or connection: the broker is gone or refused us
            detail = f"publish failed: {type(exc).__name__}: {exc}"[:500]
            raise InfrastructureError("broker", detail) from exc
