"""The outbox relay: publishes committed outbox rows in order, marks them after the confirm."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from sqlalchemy import delete, func, or_, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from tributary.contracts.catalog import NAMESPACE
from tributary.messaging import context
from tributary.messaging.db import OutboxLease, OutboxRow, is_sqlite, session_factory, utcnow
from tributary.messaging.errors import Unroutable
from tributary.messaging.publisher import Publisher, event_message
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names

log = logging.getLogger("tributary.messaging.relay")
tracer = trace.get_tracer("tributary.messaging")

LEASE_SECONDS = 15.0
_HALF_LEASE = timedelta(seconds=LEASE_SECONDS / 2)
UNROUTABLE_RETRY_SECONDS = 30.0


@dataclass
class RelayStats:
    published: int = 0
    unroutable: int = 0
    broker_errors: int = 0
    purged: int = 0


class OutboxRelay:
    """Runs inside the service; ``notify()`` after a commit wakes it at once."""

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        *,
        service: str,
        names: Names,
        settings: MessagingSettings,
    ) -> None:
        self._engine = engine
        self._sessions = session_factory(engine)
        self._publisher = publisher
        self._service = service
        self._names = names
        self._settings = settings
        self._wake = asyncio.Event()
        self._stopping = False
        self._owner = uuid.uuid4().hex
        self._sqlite = is_sqlite(engine)
        self._lease_until: datetime | None = None
        self.stats = RelayStats()
        self.healthy = True

    def notify(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.2
        loop = asyncio.get_running_loop()
        next_purge = loop.time() + self._settings.outbox_purge_seconds
        while not self._stopping:
            self._wake.clear()
            try:
                while not self._stopping:
                    published = await self.drain_once()
                    # a short batch drained everything: go on only if a commit came meanwhile
                    if published < self._settings.outbox_batch and not self._wake.is_set():
                        break
                    self._wake.clear()
                self.healthy, backoff = True, 0.2
            except Exception as exc:  # broker or database down: back off and resume
                self.healthy = False
                self.stats.broker_errors += 1
                log.warning("outbox relay paused: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 30.0)
                continue
            if loop.time() >= next_purge:
                await self.purge()
                next_purge = loop.time() + self._settings.outbox_purge_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.outbox_poll_seconds)

    def _pending_query(self) -> SelectOfScalar[OutboxRow]:
        now = utcnow()
        return (
            select(OutboxRow)
            .where(col(OutboxRow.published_at).is_(None))
            .where(
                or_(
                    col(OutboxRow.next_attempt_at).is_(None),
                    col(OutboxRow.next_attempt_at) <= now,
                )
            )
            .order_by(col(OutboxRow.seq))
            .limit(self._settings.outbox_batch)
        )

    async def drain_once(self) -> int:
        """Publish one batch of pending rows; returns how many were published."""
        if not self._sqlite:
            # PostgreSQL: the claimed rows stay locked (SKIP LOCKED for other replicas) until
            # they are marked; row locks do not block the service's own writes
            async with self._sessions() as session, session.begin():
                query = self._pending_query().with_for_update(skip_locked=True)
                rows: Sequence[OutboxRow] = (await session.exec(query)).all()
                if not rows:
                    return 0
                results = await self._publish_all(rows)
                done, failure = await self._record(session, rows, results)
        else:
            # SQLite: the lease makes this the only relay; read, then publish outside any
            # transaction so the service's writers are not held up by the confirms
            async with self._sessions() as session, session.begin():
                if not await self._hold_lease(session):
                    return 0
                rows = (await session.exec(self._pending_query())).all()
            if not rows:
                return 0
            results = await self._publish_all(rows)
            async with self._sessions() as session, session.begin():
                done, failure = await self._record(session, rows, results)
                if failure is not None:  # let a healthy replica take over at once
                    self._lease_until = None
                    await session.exec(
                        update(OutboxLease)
                        .where(col(OutboxLease.owner) == self._owner)
                        .values(expires_at=utcnow())
                    )
        if failure is not None:
            raise failure
        return done

    async def _publish_all(self, rows: Sequence[OutboxRow]) -> list[BaseException | None]:
        return await asyncio.gather(*(self._publish(row) for row in rows), return_exceptions=True)

    async def _record(
        self,
        session: AsyncSession,
        rows: Sequence[OutboxRow],
        results: list[BaseException | None],
    ) -> tuple[int, BaseException | None]:
        """Mark confirmed rows published; keep unroutable ones with their error for later."""
        done = [row.seq for row, res in zip(rows, results, strict=True) if res is None]
        if done:
            await session.exec(
                update(OutboxRow).where(col(OutboxRow.seq).in_(done)).values(published_at=utcnow())
            )
            self.stats.published += len(done)
        failure: BaseException | None = None
        retry_at = utcnow() + timedelta(seconds=UNROUTABLE_RETRY_SECONDS)
        for row, res in zip(rows, results, strict=True):
            if isinstance(res, Unroutable):
                self.stats.unroutable += 1
                log.error("outbox event %s kept: %s", row.event_id, res)
                await session.exec(
                    update(OutboxRow)
                    .where(col(OutboxRow.seq) == row.seq)
                    .values(
                        attempts=OutboxRow.attempts + 1,
                        last_error=str(res)[:1000],
                        next_attempt_at=retry_at,
                    )
                )
            elif res is not None and failure is None:
                failure = res
        return len(done), failure

    async def _publish(self, row: OutboxRow) -> None:
        parent = propagate.extract(json.loads(row.trace_headers or "{}"))
        scope = context.MessageContext(
            correlation_id=row.correlation_id,
            event_id=row.event_id,
            event_type=f"{NAMESPACE}.{row.routing_key}",
        )
        with (
            context.use(scope),
            tracer.start_as_current_span(
                f"publish {row.routing_key}",
                context=parent,
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "publish",
                    "messaging.destination.name": self._names.exchange,
                    "messaging.rabbitmq.destination.routing_key": row.routing_key,
                    "messaging.message.id": row.event_id,
                    "messaging.message.conversation_id": row.correlation_id or "",
                },
            ),
        ):
            headers: dict[str, str] = {}
            propagate.inject(headers)
            message = event_message(
                row.body,
                event_id=row.event_id,
                routing_key=row.routing_key,
                app_id=self._service,
                correlation_id=row.correlation_id,
                timestamp=row.created_at,
                headers=dict(headers),
            )
            await self._publisher.publish(self._names.exchange, row.routing_key, message)

    async def _hold_lease(self, session: AsyncSession) -> bool:
        now = utcnow()
        if self._lease_until is not None and now < self._lease_until - _HALF_LEASE:
            return True  # ours for a while yet: no write needed on this drain
        expires = now + timedelta(seconds=LEASE_SECONDS)
        result = await session.exec(
            update(OutboxLease)
            .where(col(OutboxLease.name) == "relay")
            .where(or_(col(OutboxLease.owner) == self._owner, col(OutboxLease.expires_at) < now))
            .values(owner=self._owner, expires_at=expires)
        )
        if result.rowcount:
            self._lease_until = expires
            return True
        if await session.get(OutboxLease, "relay") is None:
            session.add(OutboxLease(name="relay", owner=self._owner, expires_at=expires))
            await session.flush()
            self._lease_until = expires
            return True
        self._lease_until = None
        return False

    async def purge(self) -> int:
        """Delete rows published before the replay window."""
        cutoff = utcnow() - timedelta(hours=self._settings.outbox_replay_window_hours)
        async with self._sessions() as session, session.begin():
            result = await session.exec(
                delete(OutboxRow).where(col(OutboxRow.published_at) < cutoff)
            )
        self.stats.purged += result.rowcount or 0
        return int(result.rowcount or 0)

    async def pending(self) -> tuple[int, float | None]:
        """How many rows wait, and the age in seconds of the oldest."""
        async with self._sessions() as session:
            count, oldest = (
                await session.exec(
                    select(func.count(), func.min(OutboxRow.created_at)).where(
                        col(OutboxRow.published_at).is_(None)
                    )
                )
            ).one()
        age = (utcnow() - oldest).total_seconds() if oldest is not None else None
        return int(count), age
