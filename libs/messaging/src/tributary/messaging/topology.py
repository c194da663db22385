"""Exchange and queue names (fixed, see the README) and their idempotent declaration.

Queue arguments are fixed when a queue is created; RabbitMQ refuses a later declaration with
other values (:class:`TopologyMismatch`). Changing the delivery limit or the retry tiers
therefore goes through ``eventctl queue migrate``, which moves a stopped service's messages to
queues declared with the new arguments (see :func:`queue_arguments`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from tributary.messaging.errors import TopologyMismatch

QUORUM = {"x-queue-type": "quorum"}
MIGRATING_SUFFIX = ".migrating"
"""``<queue>.migrating`` holds a queue's messages while ``eventctl queue migrate`` replaces it."""


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

    def partition_queues(self, service: str, tiers: int, partition: int) -> QueueSet:
        """``<service>.events.p<k>`` with its own retry tiers ``<service>.events.p<k>.retry.<n>``
        (a delayed message returns to its own partition) and the service's ``<service>.dlq``."""
        base = f"{self.prefix}{service}"
        work = f"{base}.events.p{partition}"
        return QueueSet(
            consumer=service,
            work=work,
            retries=tuple(f"{work}.retry.{n}" for n in range(1, tiers + 1)),
            dlq=f"{base}.dlq",
            partition=partition,
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
    partition: int | None = None
    """Of a partition queue (``<service>.events.p<k>``): ``k``. One consumer of all replicas'
    is active on it at a time (single-active-consumer) and handles it in delivery order."""

    @property
    def ordered(self) -> bool:
        return self.partition is not None


def work_queue_arguments(qs: QueueSet, names: Names, delivery_limit: int) -> dict[str, Any]:
    ordered = {"x-single-active-consumer": True} if qs.ordered else {}
    return {
        **ordered,
        **QUORUM,
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": names.dlx,
        "x-dead-letter-routing-key": qs.dlq,
        # at-least-once dead-lettering is silently at-most-once without reject-publish
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def migrating(queue: str) -> str:
    """The holding queue of ``queue`` during a migration; it exists only while one runs."""
    return f"{queue}{MIGRATING_SUFFIX}"


def queue_arguments(
    names: Names, qs: QueueSet, *, tier_seconds: tuple[float, ...], delivery_limit: int
) -> dict[str, dict[str, Any]]:
    """Arguments of ``qs``'s work queue and retry tiers, by queue name (the DLQ has none)."""
    declared = {qs.work: work_queue_arguments(qs, names, delivery_limit)}
    for queue, ttl in zip(qs.retries, tier_seconds, strict=True):
        declared[queue] = retry_queue_arguments(qs, ttl)
    return declared


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
_VALUES = re.compile(r"received (.+?) but current is (.+?)\s*$")
_VALUE = re.compile(r"(?:the value )?'(.*?)'(?: of type '[^']*')?")


def _shown(value: str) -> str:
    """``'5'`` or ``the value '5' of type 'byte'`` as ``5``; ``none`` as ``none``."""
    return m.group(1) if (m := _VALUE.fullmatch(value.strip())) else value.strip()


def _mismatch(
    exc: ChannelPreconditionFailed, kind: str, name: str, owner: str | None = None
) -> TopologyMismatch:
    text = str(exc)
    if m := _INEQUIVALENT.search(text):
        arg, kind, name = m.groups()
        values = ""
        if v := _VALUES.search(text):
            values = f" (it has {_shown(v.group(2))}, this service declares {_shown(v.group(1))})"
        fix = "delete it or align the settings"
        if kind == "queue" and owner is not None:
            # the supported path: no message is lost, nothing is deleted by hand
            fix = (
                f"to change it, stop every consumer of {owner!r} and run "
                f"'eventctl queue migrate {owner}' with the new settings, or align the settings"
            )
        return TopologyMismatch(
            f"{kind} {name!r} exists with a different {arg!r} than this service declares"
            f"{values}; {fix}"
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

    async def queue(
        self, name: str, arguments: dict[str, Any], *, owner: str | None = None
    ) -> AbstractQueue:
        """Declare ``name``; a mismatch names ``owner``'s migration (a service or command)."""
        try:
            return await (await self._chan()).declare_queue(name, durable=True, arguments=arguments)
        except ChannelPreconditionFailed as exc:
            raise _mismatch(exc, "queue", name, owner) from None

    async def exists(self, name: str) -> bool:
        channel = await self._chan()
        try:
            await channel.declare_queue(name, passive=True)
        except ChannelNotFoundEntity:
            # the broker closed the channel; a robust one would reopen itself and stay open
            await channel.close()
            return False
        return True

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
    """Declare (idempotently) the exchanges, ``qs``'s queues and their bindings.

    Refuses to start on a queue set whose migration is unfinished: the holding queue would keep
    messages (and copies of new events) that no consumer reads.
    """
    declarer = Declarer(connection)
    try:
        if await declarer.exists(migrating(qs.work)):
            raise TopologyMismatch(
                f"queue {qs.work!r} is being migrated ({migrating(qs.work)!r} exists); finish it "
                f"with 'eventctl queue migrate {qs.consumer}' before starting {qs.consumer!r}"
            )
        events = await declarer.exchange(names.exchange, aio_pika.ExchangeType.TOPIC)
        dlx = await declarer.exchange(names.dlx, aio_pika.ExchangeType.DIRECT)
        dlq = await declarer.queue(qs.dlq, dict(QUORUM))
        await dlq.bind(dlx, routing_key=qs.dlq)
        declared = queue_arguments(
            names, qs, tier_seconds=tier_seconds, delivery_limit=delivery_limit
        )
        work = await declarer.queue(qs.work, declared.pop(qs.work), owner=qs.consumer)
        for key in sorted(set(binding_keys)):
            await work.bind(events, routing_key=key)
        for queue, arguments in declared.items():
            await declarer.queue(queue, arguments, owner=qs.consumer)
    finally:
        await declarer.close()
