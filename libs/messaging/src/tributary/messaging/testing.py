"""Test support for services built on the runtime: isolation, waiting on outcomes, DLQ reading.

No sleeps: tests wait on what the runtime reports (``OutcomeRecorder``) or on the broker.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from tributary.contracts.catalog import contracts_dir
from tributary.contracts.envelope import CloudEvent, parse_event
from tributary.messaging.bus import Bus
from tributary.messaging.consumer import Outcome, OutcomeRecord
from tributary.messaging.db import OutboxRow
from tributary.messaging.deadletters import DEAD_LETTERED
from tributary.messaging.erasure import PersonMatcher, SweepCounts
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names


@asynccontextmanager
async def started_bus(
    bus: Bus, *, consume: bool = True, owns_topology: bool = True
) -> AsyncIterator[OutcomeRecorder]:
    """Run ``bus`` recording its outcomes; stop it and, if it owns them, delete its queues."""
    outcomes = OutcomeRecorder()
    bus.listeners.append(outcomes)
    try:
        await bus.start(consume=consume)
        yield outcomes
    finally:
        await bus.stop()
        if owns_topology:  # command queues too: a leaked quorum queue holds file handles
            await delete_prefixed(bus.settings.rabbitmq_url, bus.names, bus.queue_names())


def isolated_settings(rabbitmq_url: str, **overrides: Any) -> MessagingSettings:
    """Settings whose every exchange and queue name carries a fresh prefix."""
    values: dict[str, Any] = {
        "rabbitmq_url": rabbitmq_url,
        "name_prefix": f"t{uuid.uuid4().hex[:10]}.",
        "retry_tiers": (0.2, 0.5),
        "inprocess_backoff_seconds": 0.01,
        "outbox_poll_seconds": 0.5,
        "shutdown_grace_seconds": 5.0,
    }
    values.update(overrides)
    return MessagingSettings(**values)


class OutcomeRecorder:
    """Add to ``bus.listeners``; then ``await recorder.wait_until_handled(event_id)``."""

    def __init__(self) -> None:
        self.records: list[OutcomeRecord] = []
        self._changed = asyncio.Event()

    def __call__(self, record: OutcomeRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def of(self, event_id: str, outcome: Outcome | None = None) -> list[OutcomeRecord]:
        return [
            r
            for r in self.records
            if r.event_id == event_id and (outcome is None or r.outcome == outcome)
        ]

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.records if r.outcome == outcome)

    async def wait(self, predicate: Any, *, timeout: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [(r.event_id, r.outcome, r.reason) for r in self.records[-10:]]
                raise TimeoutError(f"timed out waiting for {what or predicate}; last: {seen}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue

    async def wait_until_handled(
        self,
        event_id: str,
        outcome: Outcome = "processed",
        *,
        times: int = 1,
        timeout: float = 20.0,
    ) -> list[OutcomeRecord]:
        await self.wait(
            lambda: len(self.of(event_id, outcome)) >= times,
            timeout=timeout,
            what=f"{event_id} {outcome} x{times}",
        )
        return self.of(event_id, outcome)

    async def wait_for_count(self, outcome: Outcome, n: int, *, timeout: float = 60.0) -> None:
        await self.wait(lambda: self.count(outcome) >= n, timeout=timeout, what=f"{n} {outcome}")


class SweepRecorder:
    """A dead-letter sweeper for handler tests (``UnitOfWork(..., sweeper=SweepRecorder())``):
    records whom it was asked to sweep for, touches no broker."""

    def __init__(self) -> None:
        self.matchers: list[PersonMatcher] = []

    async def __call__(self, matcher: PersonMatcher) -> SweepCounts:
        self.matchers.append(matcher)
        return SweepCounts()

    @property
    def swept(self) -> list[tuple[str, ...]]:
        """The user id and strings of each sweep, in order."""
        return [m.texts for m in self.matchers]


@dataclass
class DlqMessage:
    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    routing_key: str | None
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str | None:
        value = self.headers.get("x-tributary-reason")
        if value is None and (deaths := self.headers.get("x-death")):
            value = deaths[0].get("reason")  # dead-lettered by the broker (delivery limit)
        return value.decode() if isinstance(value, bytes) else value


async def read_queue(
    url: str, queue: str, *, expect: int = 1, timeout: float = 20.0, ack: bool = True
) -> list[DlqMessage]:
    """Take ``expect`` messages from ``queue`` (polling ``basic.get``) or fail after ``timeout``."""
    found: list[DlqMessage] = []
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=True)
        deadline = time.monotonic() + timeout
        while len(found) < expect:
            message = await q.get(fail=False, no_ack=False)
            if message is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{queue}: {len(found)} of {expect} messages")
                await asyncio.sleep(0.05)
                continue
            found.append(
                DlqMessage(
                    body=message.body,
                    headers=dict(message.headers or {}),
                    message_id=message.message_id,
                    routing_key=message.routing_key,
                    properties={
                        "type": message.type,
                        "correlation_id": message.correlation_id,
                        "app_id": message.app_id,
                        "content_type": message.content_type,
                        "delivery_mode": message.delivery_mode,
                    },
                )
            )
            await (message.ack() if ack else message.nack(requeue=True))
    finally:
        await connection.close()
    return found


async def queue_depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def publish_raw(
    url: str,
    names: Names,
    routing_key: str,
    body: bytes,
    *,
    headers: dict[str, Any] | None = None,
    message_id: str | None = None,
    user_id: str | None = None,
) -> None:
    """Publish bytes as any well-behaved foreign producer would: persistent, confirmed,
    mandatory, and naming its broker user in ``user_id`` (the URL's user unless given)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(names.exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/cloudevents+json",
                message_id=message_id,
                headers=headers or {},
                user_id=user_id or unquote(urlsplit(url).username or "guest"),
            ),
            routing_key,
            mandatory=True,
        )
    finally:
        await connection.close()


async def delete_prefixed(url: str, names: Names, queues: Iterable[str]) -> None:
    """Remove a test's queues and its (prefixed) exchanges."""
    if not names.prefix:
        raise ValueError("refusing to delete unprefixed (shared) topology")
    connection = await aio_pika.connect(url)
    try:
        for name in queues:
            channel = await connection.channel()
            await channel.queue_delete(name)
        channel = await connection.channel()
        for exchange in (names.exchange, names.dlx):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def announced_dead_letters(engine: AsyncEngine) -> list[CloudEvent[dict[str, Any]]]:
    """The ``message.dead_lettered`` events in a service's outbox, in the order written."""
    async with engine.connect() as conn:
        bodies = (
            await conn.execute(
                select(col(OutboxRow.body))
                .where(col(OutboxRow.routing_key).startswith(f"{DEAD_LETTERED}.v"))
                .order_by(col(OutboxRow.seq))
            )
        ).scalars()
        return [parse_event(body) for body in bodies]


def partitioned_contracts(
    destination: Path,
    *,
    consumers: Mapping[str, Iterable[str]],
    partitions: Mapping[str, int],
    slots: int,
) -> Path:
    """A copy of the contracts in ``destination`` with more consumers and a ``partitioning``.

    ``consumers`` adds services to types (``{"user.email_changed": ["ordering"]}``),
    ``partitions`` opts services into partition queues. Point ``TRIBUTARY_CONTRACTS_DIR`` at the
    result (and clear :func:`tributary.contracts.catalog.catalog`'s cache) to use it.
    """
    source = contracts_dir()
    shutil.copytree(source, destination, dirs_exist_ok=True)
    with (source / "catalog.yaml").open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    for name, added in consumers.items():
        entry = raw["types"][name]
        entry["consumers"] = [*entry.get("consumers", []), *added]
    raw["partitioning"] = {"slots": slots, "services": dict(partitions)}
    with (destination / "catalog.yaml").open("w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    return destination
