"""A service's messaging: connection, topology, publisher, outbox relay and consumers."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Mapping

from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts.catalog import catalog
from tributary.contracts.events import Payload
from tributary.messaging.connection import connect_failover
from tributary.messaging.consumer import (
    Handler,
    OutcomeListener,
    QueueConsumer,
    Subscription,
    sender_trust,
)
from tributary.messaging.db import session_factory
from tributary.messaging.erasure import (
    DeadLetterQueueMissing,
    PersonMatcher,
    Provenance,
    SweepCounts,
    sweep_queue,
)
from tributary.messaging.partitions import binding_keys, partition_binding_keys
from tributary.messaging.publisher import Publisher
from tributary.messaging.relay import OutboxRelay
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names, QueueSet, declare_exchanges, declare_queue_set
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.messaging.bus")

Handlers = Mapping[type[Payload], Handler]


async def _within(op: Awaitable[object], what: str, seconds: float = 5.0) -> None:
    try:
        await asyncio.wait_for(op, seconds)
    except Exception as exc:
        log.warning("closing the %s failed: %s", what, type(exc).__name__)


class Bus:
    """Everything a service needs to produce and consume events.

    ``handlers`` subscribe the service's work queue ``<service>.events`` to those event types
    (every version; older ones are upcast to the handler's). ``commands`` consume the command
    queue named after each command type (``email.send``).
    """

    def __init__(
        self,
        service: str,
        engine: AsyncEngine,
        *,
        handlers: Handlers | None = None,
        commands: Handlers | None = None,
        settings: MessagingSettings | None = None,
    ) -> None:
        self.service = service
        self.engine = engine
        self.settings = settings or MessagingSettings()
        self.names = Names(self.settings.name_prefix)
        self._handlers = dict(handlers or {})
        self._commands = dict(commands or {})
        self._sessions = session_factory(engine)
        self._connection: AbstractRobustConnection | None = None
        # RabbitMQ blocks publishing connections under a memory or disk alarm; acks of the
        # consumers travel on their own connection so that consumption goes on meanwhile
        self._publishing: AbstractRobustConnection | None = None
        self.publisher: Publisher | None = None
        self.relay: OutboxRelay | None = None
        self.consumers: list[QueueConsumer] = []
        self.listeners: list[OutcomeListener] = []
        self._relay_task: asyncio.Task[None] | None = None

    def _subscriptions(self, handlers: Handlers) -> dict[str, Subscription]:
        subs: dict[str, Subscription] = {}
        for payload_type, handler in handlers.items():
            spec = catalog().type(payload_type.event_type)
            subs[spec.name] = Subscription(
                payload_type=payload_type,
                handler=handler,
                irreversible=spec.is_irreversible_for(self.service),
            )
        return subs

    def _queue_sets(self) -> list[tuple[QueueSet, dict[str, Subscription]]]:
        tiers = len(self.settings.retry_tiers)
        sets: list[tuple[QueueSet, dict[str, Subscription]]] = []
        partitions = catalog().partitioning.partitions(self.service)
        if self._handlers and partitions:
            subs = self._subscriptions(self._handlers)
            for k in range(partitions):
                sets.append((self.names.partition_queues(self.service, tiers, k), subs))
        elif self._handlers:
            sets.append(
                (
                    self.names.service_queues(self.service, tiers),
                    self._subscriptions(self._handlers),
                )
            )
        for payload_type, handler in self._commands.items():
            qs = self.names.command_queues(payload_type.event_type, tiers)
            sets.append((qs, self._subscriptions({payload_type: handler})))
        return sets

    def queue_names(self) -> list[str]:
        """Every queue this bus declares: its event queue set and one set per command it
        handles (work queue, DLQ, retry tiers)."""
        names = [name for qs, _ in self._queue_sets() for name in (qs.work, qs.dlq, *qs.retries)]
        return list(dict.fromkeys(names))  # partition queues share their service's DLQ

    def _binding_keys(self, qs: QueueSet, subs: Mapping[str, Subscription]) -> list[str]:
        """``<type>.*`` (and ``<type>.*.*`` for a partitioned type) of every subscription, or,
        on partition queue ``k``, the slots of each type that belong to ``k``."""
        cat = catalog()
        specs = [cat.type(name) for name in subs]
        if qs.partition is None:
            return binding_keys(specs)
        return partition_binding_keys(
            specs,
            slots=cat.partitioning.slots,
            partitions=cat.partitioning.partitions(self.service),
            partition=qs.partition,
        )

    async def start(self, *, consume: bool = True) -> None:
        """Connect, declare the topology, start the relay and (unless told not to) consumers."""
        # to the first node that answers; when it is lost, to the next (a cluster's nodes)
        self._connection = await connect_failover(
            self.settings.broker_urls,
            timeout=self.settings.connect_timeout_seconds,
            client_properties={"connection_name": f"tributary-{self.service}"},
        )
        self._publishing = await connect_failover(
            self.settings.broker_urls,
            timeout=self.settings.connect_timeout_seconds,
            client_properties={"connection_name": f"tributary-{self.service}-publish"},
        )
        await declare_exchanges(self._connection, self.names)
        queue_sets = self._queue_sets()
        for qs, subs in queue_sets:
            await declare_queue_set(
                self._connection,
                self.names,
                qs,
                binding_keys=self._binding_keys(qs, subs),
                tier_seconds=self.settings.retry_tiers,
                delivery_limit=self.settings.delivery_limit,
            )
        self.publisher = Publisher(
            self._publishing,
            in_flight=self.settings.publish_in_flight,
            timeout=self.settings.publish_timeout_seconds,
        )
        await self.publisher.open()
        self.relay = OutboxRelay(
            self.engine,
            self.publisher,
            service=self.service,
            names=self.names,
            settings=self.settings,
        )
        # supervised: a relay loop that ends for any reason is restarted
        self._relay_task = asyncio.create_task(self.relay.supervise(), name=f"{self.service}-relay")
        if consume:
            await self._consume(queue_sets)

    async def _consume(self, queue_sets: list[tuple[QueueSet, dict[str, Subscription]]]) -> None:
        """A consumer per queue set; partition queues the least-watched first, one at a time.

        On a partition queue the consumer that subscribed first is the active one. Replicas
        started together spread over the partitions: each takes the partition with the fewest
        consumers (ties at random), waits ``partition_stagger_seconds``, and goes on.
        """
        if self._connection is None or self.publisher is None or self.relay is None:
            raise RuntimeError(f"{self.service}: the bus is not started")
        plain = [(qs, subs) for qs, subs in queue_sets if not qs.ordered]
        partitioned = [(qs, subs) for qs, subs in queue_sets if qs.ordered]
        order = plain
        while True:
            for qs, subs in order:
                consumer = QueueConsumer(
                    service=self.service,
                    queues=qs,
                    subscriptions=subs,
                    engine=self.engine,
                    publisher=self.publisher,
                    names=self.names,
                    settings=self.settings,
                    on_commit=self.relay.notify,
                    listeners=self.listeners,
                    broker_ready=self.publishing_ready,
                    sweeper=self.sweep_dead_letters,
                )
                await consumer.start(self._connection)
                self.consumers.append(consumer)
            if not partitioned:
                return
            if order is not plain:
                await asyncio.sleep(self.settings.partition_stagger_seconds)
            counts = await self._consumer_counts([qs.work for qs, _ in partitioned])
            fewest = min(counts.values())
            pick = random.choice(  # noqa: S311 (spreads replicas; not a secret)
                [item for item in partitioned if counts[item[0].work] == fewest]
            )
            partitioned.remove(pick)
            order = [pick]

    async def _consumer_counts(self, queues: list[str]) -> dict[str, int]:
        """Consumers per queue (passive declares on a short-lived, plain channel)."""
        if self._connection is None:
            raise RuntimeError(f"{self.service}: the bus is not started")
        counts: dict[str, int] = {}
        channel = await self._connection.channel()
        try:
            for name in queues:
                declared = await channel.declare_queue(name, passive=True, robust=False)
                counts[name] = int(declared.declaration_result.consumer_count or 0)
        finally:
            await channel.close()
        return counts

    async def stop(self) -> None:
        """Graceful: stop consuming, finish in-flight batches, flush the relay, close."""
        for consumer in self.consumers:
            await consumer.stop()
        self.consumers.clear()
        if self.relay is not None and self._relay_task is not None:
            self.relay.stop()
            try:
                await asyncio.wait_for(self._relay_task, self.settings.shutdown_grace_seconds)
            except TimeoutError:
                self._relay_task.cancel()
        # with the broker gone, closing waits for a reconnect that may never come
        if self.publisher is not None:
            await _within(self.publisher.close(), "publisher")
        for connection in (self._publishing, self._connection):
            if connection is not None:
                await _within(connection.close(), "connection")
        self._connection = self._publishing = None

    def unit_of_work(self) -> UnitOfWork:
        """A unit of work for request handlers; committing wakes the relay."""
        on_commit = self.relay.notify if self.relay is not None else None
        return UnitOfWork(
            self._sessions(),
            f"/services/{self.service}",
            on_commit=on_commit,
            sweeper=self.sweep_dead_letters,
        )

    async def sweep_dead_letters(self, matcher: PersonMatcher) -> SweepCounts:
        """Remove the messages about one person from every dead-letter queue of this service
        (its own and its command queues'), putting the others back; see
        :func:`tributary.messaging.erasure.sweep_queue`."""
        if self._connection is None or self.publisher is None:
            raise RuntimeError(f"{self.service}: the bus is not started")
        counts = SweepCounts()
        provenance = None
        if self.settings.verify_sender:
            trust = sender_trust(self.service, self.publisher.user, self.settings)
            provenance = Provenance(self.settings.broker_user_prefix, trust)
        for dlq in dict.fromkeys(qs.dlq for qs, _subs in self._queue_sets()):
            try:
                counts += await sweep_queue(
                    self._connection, self.publisher, dlq, matcher, provenance=provenance
                )
            except DeadLetterQueueMissing:  # deleted by hand: nothing in it to erase
                log.warning("%s: no queue %s to sweep", self.service, dlq)
        return counts

    async def queue_depths(self, queues: list[str]) -> dict[str, int]:
        """Ready messages per queue (passive declares on a short-lived channel)."""
        if self._connection is None:
            return {}
        depths: dict[str, int] = {}
        # a fresh, plain channel: a robust channel answers a passive declare from its cache
        channel = await self._connection.channel()
        try:
            for name in queues:
                declared = await channel.declare_queue(name, passive=True, robust=False)
                depths[name] = int(declared.declaration_result.message_count or 0)
        finally:
            await channel.close()
        return depths

    @property
    def dead_letter_queues(self) -> list[str]:
        return list(dict.fromkeys(c.queues.dlq for c in self.consumers))

    @property
    def connected(self) -> bool:
        return all(c is not None and not c.is_closed for c in (self._connection, self._publishing))

    @property
    def consuming(self) -> bool:
        return all(c.running for c in self.consumers)

    def publishing_ready(self) -> bool:
        """The publishing connection is open and not blocked by a broker alarm."""
        return (
            self._publishing is not None
            and not self._publishing.is_closed
            and not _blocked(self._publishing)
        )

    async def health(self) -> dict[str, tuple[bool, str | None]]:
        """Each part of the messaging side: ready, or why not."""
        checks: dict[str, tuple[bool, str | None]] = {}
        if not self.connected:
            checks["broker"] = (False, "not connected to the broker")
        elif not self.publishing_ready():
            checks["broker"] = (False, "publishing blocked by the broker (memory or disk alarm)")
        else:
            checks["broker"] = (True, None)
        if self.relay is not None:
            if self._relay_task is not None and self._relay_task.done():
                checks["relay"] = (False, "the outbox relay has stopped")
            else:
                checks["relay"] = await self.relay.health()
        consumers = [await c.health() for c in self.consumers]
        reasons = [reason for ok, reason in consumers if not ok and reason]
        checks["consumers"] = (not reasons, "; ".join(reasons) or None)
        return checks


def _blocked(connection: AbstractRobustConnection) -> bool:
    """Whether the broker sent ``connection.blocked`` (aiormq keeps it privately)."""
    transport = getattr(connection, "transport", None)
    underlying = getattr(transport, "connection", None)
    unblocked = getattr(underlying, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()
