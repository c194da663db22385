"""Broker access for the operator commands: where to connect, queue names, held reads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import TracebackType

from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import ChannelNotFoundEntity

from tributary.contracts.catalog import catalog
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names, QueueSet

GET_TIMEOUT = 10.0


class QueueMissing(RuntimeError):
    """A queue the command needs does not exist (wrong name or prefix?)."""


@dataclass(frozen=True)
class BrokerOptions:
    url: str
    prefix: str


def broker_options(url: str | None, prefix: str | None) -> BrokerOptions:
    """``--url``/``--prefix``, else ``RABBITMQ_URL``/``TRIBUTARY_NAME_PREFIX``, else defaults."""
    if url is None or prefix is None:
        settings = MessagingSettings()
        url = settings.rabbitmq_url if url is None else url
        prefix = settings.name_prefix if prefix is None else prefix
    return BrokerOptions(url, prefix)


def redact(url: str) -> str:
    """The URL without its password, fit for messages."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


def is_command(name: str) -> bool:
    spec = catalog().types.get(name)
    return spec is not None and spec.kind == "command"


def queues_for(name: str, prefix: str) -> QueueSet:
    """The queues of a service (``onboarding``) or a command queue (``email.send``).

    A trailing ``.dlq`` is accepted, so ``onboarding.dlq`` names the same queues.
    """
    name = name.removesuffix(".dlq")
    names = Names(prefix)
    if is_command(name):
        return names.command_queues(name, 0)
    return names.service_queues(name, 0)


async def require_queue(connection: AbstractConnection, name: str) -> None:
    """:class:`QueueMissing` unless queue ``name`` exists."""
    # a failed passive declare closes its channel: use a throw-away one
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:
        raise QueueMissing(f"queue {name!r} does not exist (check the name and --prefix)") from None
    finally:
        if not channel.is_closed:
            await channel.close()


class HeldReader:
    """Reads a queue with ``basic.get`` and holds what it read unacknowledged until it exits.

    A message nacked with requeue while reading would be handed out again by the next
    ``basic.get``; held messages are not, so each message is read once. Reading stops at the
    number of messages the queue had at the first read (the count in that ``get-ok``; the
    count a passive declare reports for a quorum queue lags behind recent requeues), so
    messages that arrive meanwhile -- a replayed message dead-lettered again -- are left for
    the next run. On exit every message not acknowledged is requeued; if the process dies
    instead, the broker requeues them when the channel closes. Nothing is removed except by
    :meth:`ack`.
    """

    def __init__(self, connection: AbstractConnection, queue: str) -> None:
        self._connection = connection
        self.queue = queue
        self.read = 0
        self.total: int | None = None
        """Messages in the queue at the first read: the most this reader reads."""
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._held: dict[int, AbstractIncomingMessage] = {}

    async def __aenter__(self) -> HeldReader:
        self._channel = await self._connection.channel(publisher_confirms=False)
        try:
            self._queue = await self._channel.declare_queue(self.queue, passive=True)
        except ChannelNotFoundEntity:
            raise QueueMissing(
                f"queue {self.queue!r} does not exist (check the name and --prefix)"
            ) from None
        return self

    def __aiter__(self) -> HeldReader:
        return self

    async def __anext__(self) -> AbstractIncomingMessage:
        if self._queue is None:
            raise RuntimeError("HeldReader is not open")
        if self.total is not None and self.read >= self.total:
            raise StopAsyncIteration
        message = await self._queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
        if message is None:  # empty, or someone else took the rest
            self.total = self.read
            raise StopAsyncIteration
        if self.total is None:  # get-ok counts the messages left behind this one
            self.total = int(message.message_count or 0) + 1
        self.read += 1
        self._held[_tag(message)] = message
        return message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Remove ``message`` from the queue for good."""
        await message.ack()
        self._held.pop(_tag(message), None)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        channel, held = self._channel, list(self._held.values())
        self._held.clear()
        if channel is None or channel.is_closed:
            return  # the broker has requeued everything this channel held
        try:
            # reading is over, so a requeued message cannot come back to this reader
            for message in held:
                await message.nack(requeue=True)
        finally:
            await channel.close()


def _tag(message: AbstractIncomingMessage) -> int:
    if message.delivery_tag is None:
        raise RuntimeError("a basic.get delivery without a delivery tag")
    return message.delivery_tag
