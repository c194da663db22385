"""Shared by the relay tests: a capture queue, outbox rows written any way, a test-driven relay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from sqlalchemy.event import listen, remove
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from libs.contracts.tests.samples import sample
from tributary.contracts.envelope import new_event
from tributary.contracts.events import Payload, UserCreatedV2
from tributary.messaging.db import OutboxRow, session_factory, utcnow
from tributary.messaging.publisher import Publisher
from tributary.messaging.relay import OutboxRelay, RelayPolicy
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names, declare_exchanges
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.waiting import eventually

SERVICE = "signup"
_MARKER = "capture-flush-marker"


def new_user() -> UserCreatedV2:
    return UserCreatedV2.model_validate(sample("user.created.v2"))


class Capture:
    """A private queue bound to the test's exchange: what the relay put on the wire, in order."""

    def __init__(self, url: str, names: Names, binding_keys: Sequence[str] = ("#",)) -> None:
        self._url = url
        self._names = names
        self._binding_keys = binding_keys
        self.messages: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Event()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None

    async def __aenter__(self) -> Capture:
        self._connection = await aio_pika.connect(self._url)
        await declare_exchanges(self._connection, self._names)
        self._channel = await self._connection.channel()
        self._queue = await self._channel.declare_queue("", exclusive=True)
        for key in self._binding_keys:
            await self._queue.bind(self._names.exchange, routing_key=key)
        await self._queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def _until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what}: {len(self.messages)} messages after {timeout} s")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                continue

    async def take(self, n: int, *, timeout: float = 20.0) -> list[AbstractIncomingMessage]:
        """Wait until ``n`` messages have arrived; return all received so far."""
        await self._until(lambda: len(self.messages) >= n, timeout, f"waiting for {n}")
        return list(self.messages)

    async def flush(self, *, timeout: float = 20.0) -> list[AbstractIncomingMessage]:
        """Everything the queue held before now (FIFO: a marker sent last arrives last)."""
        assert self._channel is not None
        assert self._queue is not None
        await self._channel.default_exchange.publish(
            aio_pika.Message(b"", message_id=_MARKER), routing_key=self._queue.name
        )
        await self._until(
            lambda: any(m.message_id == _MARKER for m in self.messages), timeout, "flushing"
        )
        return [m for m in self.messages if m.message_id != _MARKER]


class RelayFetches:
    """Counts the relay's fetches of pending rows, to know when it has gone idle."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.sync_engine
        self.count = 0

    def __enter__(self) -> RelayFetches:
        listen(self._engine, "after_cursor_execute", self._executed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        remove(self._engine, "after_cursor_execute", self._executed)

    def _executed(self, *args: Any) -> None:
        statement = str(args[2])
        # drain_once's query; the test's own reads have no LIMIT
        if "FROM tributary_outbox" in statement and "LIMIT" in statement:
            self.count += 1

    async def wait_for(self, count: int) -> None:
        async def reached() -> bool:
            return self.count >= count

        await eventually(reached)


async def outbox_rows(engine: AsyncEngine) -> list[OutboxRow]:
    async with session_factory(engine)() as session:
        return list((await session.exec(select(OutboxRow).order_by(col(OutboxRow.seq)))).all())


async def row_of(engine: AsyncEngine, event_id: str) -> OutboxRow:
    [row] = [r for r in await outbox_rows(engine) if r.event_id == event_id]
    return row


async def commit_events(engine: AsyncEngine, payloads: Sequence[Payload]) -> list[str]:
    """Commit outbox rows as another process would: no relay in this one is told."""
    async with UnitOfWork(session_factory(engine)(), f"/services/{SERVICE}") as uow:
        ids = [uow.outbox.add(payload).id for payload in payloads]
        await uow.commit()
    return ids


async def insert_rows(engine: AsyncEngine, rows: Sequence[OutboxRow]) -> None:
    async with session_factory(engine)() as session, session.begin():
        session.add_all(rows)


def raw_row(
    routing_key: str = "user.created.v2",
    *,
    created_at: datetime | None = None,
    published_at: datetime | None = None,
) -> OutboxRow:
    """An outbox row written directly, bypassing ``Outbox.add`` (any routing key, any age)."""
    data: dict[str, Any] = {}
    event = new_event(routing_key=routing_key, source=f"/services/{SERVICE}", data=data)
    return OutboxRow(
        event_id=event.id,
        routing_key=routing_key,
        body=event.to_bytes(),
        created_at=created_at or utcnow(),
        published_at=published_at,
    )


def unix_seconds(moment: datetime) -> int:
    """Whole seconds since the epoch; naive datetimes are UTC (as stored and as sent)."""
    return int(moment.replace(tzinfo=moment.tzinfo or UTC).timestamp())


def relay_with(
    engine: AsyncEngine,
    publisher: Publisher,
    settings: MessagingSettings,
    policy: RelayPolicy | None = None,
) -> OutboxRelay:
    """A relay that the test drives (``drain_once``) or runs (``supervise``) itself."""
    return OutboxRelay(
        engine,
        publisher,
        service=SERVICE,
        names=Names(settings.name_prefix),
        settings=settings,
        policy=policy,
    )


@asynccontextmanager
async def supervised(relay: OutboxRelay) -> AsyncIterator[asyncio.Task[None]]:
    """The relay as the bus runs it; stopped (and checked to stop) afterwards."""
    task = asyncio.create_task(relay.supervise())
    try:
        yield task
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)
