"""Exchange and queue names (fixed, see the README) and their idempotent declaration."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed

from tributary.messaging.errors import TopologyMismatch

QUORUM = {"x-queue-type": "quorum"}


@dataclass(frozen=True)
class Names:
    """Every broker name, optionally prefixed (tests isolate themselves with a prefix)."""

    prefix: str = ""

    @property
    def exchange(self) -> str:
        return f"{self.prefix}tributary.events"

    @property
    def dlx(self) -> str:
        return f"{self.prefix}tributary.dlx"

    def service_queues(self, service: str, tiers: int) -> QueueSet:
        """``<service>.events``, ``<service>.retry.<n>``, ``<service>.dlq``."""
        base = f"{self.prefix}{service}"
        return QueueSet(
            consumer=service,
            work=f"{base}.events",
            retries=tuple(f"{base}.retry.{n}" for n in range(1, tiers + 1)),
            dlq=f"{base}.dlq",
        )

    def command_queues(self, command: str, tiers: int) -> QueueSet:
        """``email.send``, ``email.send.retry.<n>``, ``email.send.dlq``."""
        base = f"{self.prefix}{command}"
        return QueueSet(
            consumer=command,
            work=base,
            retries=tuple(f"{base}.retry.{n}" for n in range(1, tiers + 1)),
            dlq=f"{base}.dlq",
        )


@dataclass(frozen=True)
class QueueSet:
    """A work queue with its delayed-retry tiers and dead-letter queue."""

    consumer: str
    work: str
    retries: tuple[str, ...]
    dlq: str


def work_queue_arguments(qs: QueueSet, names: Names, delivery_limit: int) -> dict[str, Any]:
    return {
        **QUORUM,
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": names.dlx,
        "x-dead-letter-routing-key": qs.dlq,
        # at-least-once dead-lettering is silently at-most-once without reject-publish
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def retry_queue_arguments(qs: QueueSet, ttl_seconds: float) -> dict[str, Any]:
    return {
        **QUORUM,
        "x-message-ttl": round(ttl_seconds * 1000),
        # back through the default exchange: the copy reaches only our own work queue
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": qs.work,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (queue|exchange) '([^']+)'")


def _mismatch(exc: ChannelPreconditionFailed, kind: str, name: str) -> TopologyMismatch:
    text = str(exc)
    if m := _INEQUIVALENT.search(text):
        arg, kind, name = m.groups()
        return TopologyMismatch(
            f"{kind} {name!r} exists with a different {arg!r} than this service declares "
            f"({text}); delete it or align the settings"
        )
    return TopologyMismatch(f"{kind} {name!r} exists with other properties: {text}")


class Declarer:
    """Declares on a throw-away channel: a precondition failure closes the channel."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None

    async def _chan(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(publisher_confirms=False)
        return self._channel

    async def exchange(self, name: str, kind: aio_pika.ExchangeType) -> AbstractExchange:
        try:
            return await (await self._chan()).declare_exchange(name, kind, durable=True)
        except ChannelPreconditionFailed as exc:
            raise _mismatch(exc, "exchange", name) from None

    async def queue(self, name: str, arguments: dict[str, Any]) -> AbstractQueue:
        try:
            return await (await self._chan()).declare_queue(name, durable=True, arguments=arguments)
        except ChannelPreconditionFailed as exc:
            raise _mismatch(exc, "queue", name) from None

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


async def declare_exchanges(connection: AbstractConnection, names: Names) -> None:
    declarer = Declarer(connection)
    try:
        await declarer.exchange(names.exchange, aio_pika.ExchangeType.TOPIC)
        await declarer.exchange(names.dlx, aio_pika.ExchangeType.DIRECT)
    finally:
        await declarer.close()


async def declare_queue_set(
    connection: AbstractConnection,
    names: Names,
    qs: QueueSet,
    *,
    binding_keys: Iterable[str],
    tier_seconds: tuple[float, ...],
    delivery_limit: int,
) -> None:
    """Declare (idempotently) the exchanges, ``qs``'s queues and their bindings."""
    declarer = Declarer(connection)
    try:
        events = await declarer.exchange(names.exchange, aio_pika.ExchangeType.TOPIC)
        dlx = await declarer.exchange(names.dlx, aio_pika.ExchangeType.DIRECT)
        dlq = await declarer.queue(qs.dlq, dict(QUORUM))
        await dlq.bind(dlx, routing_key=qs.dlq)
        work = await declarer.queue(qs.work, work_queue_arguments(qs, names, delivery_limit))
        for key in sorted(set(binding_keys)):
            await work.bind(events, routing_key=key)
        for queue, ttl in zip(qs.retries, tier_seconds, strict=True):
            await declarer.queue(queue, retry_queue_arguments(qs, ttl))
    finally:
        await declarer.close()
