"""``eventctl queue migrate``: give a stopped service's queues new arguments, losing nothing.

RabbitMQ fixes a queue's arguments (``x-delivery-limit``, ``x-message-ttl``) when the queue is
created. To change the delivery limit or the retry tiers, each queue whose arguments differ
is replaced: its messages are moved to a holding queue ``<queue>.migrating``, the queue is
deleted (only if empty and unused: the broker refuses otherwise) and declared again with the
new arguments, and the messages are moved back. Every move publishes a copy with confirms and
acks the original only after its confirm, so a message is always in at least one of the two
queues; a crash leaves duplicates at worst, which the service's inbox drops.

While the work queue is replaced, the holding queue is bound to the same routing keys first,
so events published meanwhile are kept; the retry queues are parked first, so nothing expires
into the work queue while it is gone. The service's consumers must be stopped (checked);
producers may keep running. ``<work>.migrating`` exists from start to end: a service refuses
to start while it does, and running the command again finishes an interrupted migration.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelLockedResource

from tributary.eventctl.admin import Binding, BrokerAdmin, QueueInfo
from tributary.eventctl.broker import HeldReader, QueueMissing
from tributary.messaging import headers as h
from tributary.messaging.publisher import Publisher
from tributary.messaging.topology import (
    MIGRATING_SUFFIX,
    QUORUM,
    Declarer,
    Names,
    QueueSet,
    migrating,
    queue_arguments,
)

DELETE_ATTEMPTS = 5
Say = Callable[[str], None]


class MigrationBlocked(RuntimeError):
    """The migration cannot run now (consumers attached, another migration running)."""


@dataclass(frozen=True)
class Target:
    """What a queue set becomes: its queues (with the new tier count) and their arguments."""

    names: Names
    queues: QueueSet
    arguments: dict[str, dict[str, Any]]

    @classmethod
    def of(
        cls,
        names: Names,
        consumer: QueueSet,
        *,
        delivery_limit: int,
        tier_seconds: tuple[float, ...],
    ) -> Target:
        qs = QueueSet(
            consumer=consumer.consumer,
            work=consumer.work,
            retries=tuple(f"{retry_root(consumer)}{n}" for n in range(1, len(tier_seconds) + 1)),
            dlq=consumer.dlq,
        )
        arguments = queue_arguments(
            names, qs, tier_seconds=tier_seconds, delivery_limit=delivery_limit
        )
        return cls(names, qs, arguments)


def retry_root(qs: QueueSet) -> str:
    """``<base>.retry.``: tier queues and the DLQ share ``<base>`` for services and commands."""
    return f"{qs.dlq.removesuffix('.dlq')}.retry."


@dataclass
class Plan:
    """What the broker holds now, and what has to change."""

    work_exists: bool
    replace_work: bool
    resuming: bool
    replace_retries: list[str]
    create_retries: list[str]
    remove_retries: list[str]
    park: list[str]
    """Retry queues whose messages wait in their holding queue while the set is replaced."""
    differences: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return bool(
            self.resuming
            or self.replace_work
            or self.replace_retries
            or self.create_retries
            or self.remove_retries
        )


@dataclass
class Moved:
    """Messages moved, per ``source -> target``."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, source: str, target: str, n: int) -> None:
        if n:
            key = f"{source} -> {target}"
            self.counts[key] = self.counts.get(key, 0) + n


def _normalized(arguments: dict[str, Any]) -> dict[str, Any]:
    # integers print as ints from both rabbitmqctl and HTTP; compare values, not wire types
    return {
        k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in arguments.items()
    }


def _differs(info: QueueInfo, wanted: dict[str, Any]) -> list[str]:
    have, want = _normalized(info.arguments), _normalized(wanted)
    return [
        f"{info.name}: {key} {have.get(key, 'none')} -> {want.get(key, 'none')}"
        for key in sorted(set(have) | set(want))
        if have.get(key) != want.get(key)
    ]


def _held(name: str) -> str:
    """``<queue>.migrating`` -> ``<queue>``."""
    return name.removesuffix(MIGRATING_SUFFIX)


def plan(target: Target, queues: dict[str, QueueInfo]) -> Plan:
    """Compare the broker's queues with ``target``; raise if the migration cannot run now."""
    qs = target.queues
    tier = re.compile(re.escape(retry_root(qs)) + r"\d+")
    existing = sorted(name for name in queues if tier.fullmatch(name))
    # retry queues an interrupted run left messages of in their holding queue
    held = sorted(
        _held(n) for n in queues if n.endswith(MIGRATING_SUFFIX) and tier.fullmatch(_held(n))
    )
    resuming = migrating(qs.work) in queues
    work = queues.get(qs.work)
    if work is None and not resuming:
        raise QueueMissing(
            f"queue {qs.work!r} does not exist: nothing to migrate (check the name and "
            f"--prefix; a service declares its queues when it starts)"
        )
    involved = [qs.work, *existing, *(migrating(n) for n in [qs.work, *held])]
    busy = sorted(
        f"{n} ({queues[n].consumers})" for n in involved if n in queues and queues[n].consumers
    )
    if busy:
        raise MigrationBlocked(
            f"consumers are attached to {', '.join(busy)}: stop every instance of "
            f"{qs.consumer!r} first"
        )

    differences = _differs(work, target.arguments[qs.work]) if work is not None else []
    replace_work = work is None or bool(differences)
    replace: list[str] = []
    create: list[str] = []
    for name in qs.retries:
        info = queues.get(name)
        if info is None:
            (replace if name in held else create).append(name)
        elif diff := _differs(info, target.arguments[name]):
            differences += diff
            replace.append(name)
    remove = sorted({n for n in [*existing, *held] if n not in qs.retries})
    # while the work queue is gone nothing may expire into it: then every tier is parked
    park = existing if replace_work else [n for n in existing if n in replace or n in remove]
    return Plan(
        work_exists=work is not None,
        replace_work=replace_work,
        resuming=resuming,
        replace_retries=replace,
        create_retries=create,
        remove_retries=remove,
        park=sorted({*park, *held}),
        differences=differences,
    )


def describe(target: Target, p: Plan) -> list[str]:
    qs = target.queues
    lines = []
    if p.resuming:
        lines.append(f"resuming an unfinished migration of {qs.work}")
    lines += [f"  {d}" for d in p.differences]
    if p.replace_work:
        lines.append(f"replace {qs.work} (messages held in {migrating(qs.work)} meanwhile)")
    lines += [f"replace {name}" for name in p.replace_retries]
    lines += [f"create {name}" for name in p.create_retries]
    lines += [f"remove {name} (its messages go to {qs.work} now)" for name in p.remove_retries]
    if p.park:
        lines.append(f"park the messages of {', '.join(p.park)} meanwhile")
    return lines


class Migration:
    """One run of the migration; every step reads the broker's state, so a rerun resumes."""

    def __init__(
        self,
        connection: AbstractConnection,
        admin: BrokerAdmin,
        target: Target,
        *,
        batch: int,
        say: Say,
    ) -> None:
        self._connection = connection
        self._admin = admin
        self.target = target
        self._batch = batch
        self._say = say
        self.moved = Moved()
        self._publisher = Publisher(connection, in_flight=batch)
        self._lock_name = f"{target.queues.work}.migration-lock"

    async def run(self, p: Plan) -> None:
        qs = self.target.queues
        lock = await self._lock()
        await self._publisher.open()
        try:
            await self._refuse_if_consumed([qs.work, *qs.retries])
            declarer = Declarer(self._connection)
            try:
                # the marker: a service refuses to start while it exists
                await declarer.queue(migrating(qs.work), dict(QUORUM))
                for name in p.park:
                    await declarer.queue(migrating(name), dict(QUORUM))
                    await self.move(name, migrating(name))
                if p.replace_work or p.resuming:
                    await self._work(p, declarer)
                await self._retries(p, declarer)
            finally:
                await declarer.close()
            await self._delete(migrating(qs.work), also_move_to=qs.work)
        finally:
            await self._publisher.close()
            await lock.close()  # the lock queue goes with its channel's connection, or now:
            async with self._channel() as channel:
                await channel.queue_delete(self._lock_name)

    async def _refuse_if_consumed(self, names: list[str]) -> None:
        """The broker's own consumer count, before anything moves (rabbitmqctl's may lag)."""
        for name in names:
            if not await self._exists(name):
                continue
            async with self._channel() as channel:
                declared = await channel.declare_queue(name, passive=True)
            if declared.declaration_result.consumer_count:
                raise MigrationBlocked(
                    f"consumers are attached to {name}: stop every instance of "
                    f"{self.target.queues.consumer!r} first"
                )

    async def _lock(self) -> AbstractChannel:
        """An exclusive queue: a second migration of the same set fails instead of interleaving."""
        channel = await self._connection.channel(publisher_confirms=False)
        name = self._lock_name
        try:
            await channel.declare_queue(name, exclusive=True, auto_delete=True)
        except ChannelLockedResource:
            raise MigrationBlocked(
                f"another 'eventctl queue migrate' holds {name!r}; wait for it to finish"
            ) from None
        return channel

    async def _work(self, p: Plan, declarer: Declarer) -> None:
        qs, holding = self.target.queues, migrating(self.target.queues.work)
        keys = await self._keys()
        if p.replace_work:
            # new events land in the holding queue from here on
            work_exists = await self._exists(qs.work)
            await self._switch(keys, to=holding, away_from=qs.work if work_exists else None)
            if work_exists:
                await self._empty_and_delete(qs.work, holding)
            await declarer.queue(qs.work, self.target.arguments[qs.work], owner=qs.consumer)
            self._say(f"declared {qs.work} with the new arguments")
        await self._switch(keys, to=qs.work, away_from=holding)
        await self.move(holding, qs.work)

    async def _retries(self, p: Plan, declarer: Declarer) -> None:
        qs, arguments = self.target.queues, self.target.arguments
        for name in qs.retries:
            if name in p.replace_retries and await self._exists(name):
                await self._empty_and_delete(name, migrating(name))
            if name in p.replace_retries or name in p.create_retries:
                await declarer.queue(name, arguments[name], owner=qs.consumer)
                self._say(f"declared {name} with the new arguments")
            await self._delete(migrating(name), also_move_to=name)
        for name in p.remove_retries:
            if await self._exists(name):
                await self._empty_and_delete(name, migrating(name))
            # a tier that no longer exists: its messages are retried now
            await self._delete(migrating(name), also_move_to=qs.work)

    async def _keys(self) -> list[Binding]:
        """The work queue's routing keys: on the queue, or on its holding queue if resumed."""
        qs = self.target.queues
        found = await self._admin.bindings(qs.work) + await self._admin.bindings(migrating(qs.work))
        unique = {(b.exchange, b.routing_key, repr(sorted(b.arguments.items()))): b for b in found}
        return list(unique.values())

    async def _switch(self, keys: list[Binding], *, to: str, away_from: str | None) -> None:
        """Bind ``to`` first, then unbind ``away_from``: no instant with neither bound.

        An event published between the two lands in both (a duplicate the inbox drops); on one
        channel, back to back, that window is a round trip per key.
        """
        async with self._channel() as channel:
            target = await channel.get_queue(to, ensure=False)
            for b in keys:
                await target.bind(b.exchange, routing_key=b.routing_key, arguments=b.arguments)
            if away_from is not None:
                source = await channel.get_queue(away_from, ensure=False)
                for b in keys:
                    await source.unbind(
                        b.exchange, routing_key=b.routing_key, arguments=b.arguments
                    )

    def _channel(self) -> _Channel:
        return _Channel(self._connection)

    async def _exists(self, queue: str) -> bool:
        declarer = Declarer(self._connection)
        try:
            return await declarer.exists(queue)
        finally:
            await declarer.close()

    async def _empty_and_delete(self, queue: str, holding: str) -> None:
        """Move ``queue``'s messages to ``holding``, then delete it once it is empty and unused.

        Quorum queues refuse ``if-empty``/``if-unused`` deletes (RabbitMQ 3.10 closes the
        connection), so both are checked just before a plain delete. Nothing routes to the queue
        by then (unbound, tiers parked, consumers stopped) but a publish by name -- a replay --
        in that instant would be deleted with it; the delete reports how many were.
        """
        for _ in range(DELETE_ATTEMPTS):
            await self.move(queue, holding)
            async with self._channel() as channel:
                declared = await channel.declare_queue(queue, passive=True)
                result = declared.declaration_result
                if result.consumer_count:
                    raise MigrationBlocked(
                        f"consumers are attached to {queue}: stop every instance of its "
                        "service first, then run again"
                    )
                if result.message_count:
                    continue  # one arrived since the move
                deleted = await channel.queue_delete(queue)
            if lost := int(getattr(deleted, "message_count", 0) or 0):
                raise MigrationBlocked(
                    f"{lost} message(s) were published to {queue} by name while it was being "
                    "replaced and were deleted with it; republish them (eventctl replay outbox)"
                )
            self._say(f"deleted {queue}")
            return
        raise MigrationBlocked(f"{queue} kept receiving messages; stop what publishes to it")

    async def _delete(self, holding: str, *, also_move_to: str) -> None:
        """Empty ``holding`` into ``also_move_to`` and delete it (if it exists)."""
        if not await self._exists(holding):
            return
        await self._empty_and_delete(holding, also_move_to)

    async def move(self, source: str, target: str) -> int:
        """Move every message of ``source`` to ``target``, until a pass finds none."""
        if not await self._exists(source):
            return 0
        total = 0
        while moved := await self._move_pass(source, target):
            total += moved
        self.moved.add(source, target, total)
        if total:
            self._say(f"moved {total} message(s) {source} -> {target}")
        return total

    async def _move_pass(self, source: str, target: str) -> int:
        moved = 0
        async with HeldReader(self._connection, source) as reader:
            pending: list[AbstractIncomingMessage] = []
            async for message in reader:
                pending.append(message)
                if len(pending) >= self._batch:
                    moved += await self._flush(reader, pending, target)
            moved += await self._flush(reader, pending, target)
        return moved

    async def _flush(
        self, reader: HeldReader, pending: list[AbstractIncomingMessage], target: str
    ) -> int:
        """Publish copies of ``pending`` to ``target``; ack each original after its confirm."""
        batch = list(pending)
        pending.clear()
        results = await asyncio.gather(
            *(self._publisher.publish("", target, _copy(m)) for m in batch), return_exceptions=True
        )
        for message, result in zip(batch, results, strict=True):
            if not isinstance(result, BaseException):
                await reader.ack(message)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the rest go back to the source when the reader closes
        return len(batch)


def _copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    """Body, properties and our headers; the topic routing key kept in a header."""
    extra = {}
    if h.ROUTING_KEY not in (message.headers or {}) and (key := h.original_routing_key(message)):
        extra[h.ROUTING_KEY] = key
    return h.copy_of(message, extra)


class _Channel:
    """A throw-away channel: a failed delete or bind closes the channel it ran on."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> AbstractChannel:
        self._channel = await self._connection.channel(publisher_confirms=False)
        return self._channel

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


async def migrate(
    connection: AbstractConnection,
    admin: BrokerAdmin,
    target: Target,
    *,
    batch: int = 100,
    dry_run: bool = False,
    say: Say | None = None,
) -> Moved:
    """Bring ``target``'s queues to their new arguments; returns what was moved."""
    out: Say = say or (lambda line: print(line, file=sys.stdout))
    p = plan(target, await admin.queues())
    if not p.needed:
        out(f"{target.queues.consumer}: queues already have these arguments; nothing to do")
        return Moved()
    for line in describe(target, p):
        out(line)
    if dry_run:
        out("dry run: nothing changed")
        return Moved()
    run = Migration(connection, admin, target, batch=batch, say=out)
    await run.run(p)
    out(f"{target.queues.consumer}: migrated")
    return run.moved
