"""A hand-written event store on SQLAlchemy: append with an expected version, read a stream,
read everything after a position. Why hand-written rather than a library: the ADR on the
event store in docs/adr.

* One table, ``event_store``: ``(position, event_id, stream_id, version, type,
  schema_version, data, metadata, recorded_at)``, unique ``(stream_id, version)``,
  append-only (triggers refuse updates and deletes).
* **Optimistic concurrency**: ``append(stream, expected_version, events)`` fails with
  :class:`ConcurrencyConflict` when the stream is not at ``expected_version`` any more;
  the unique key is the backstop when two appends race past the check.
* **Appends are serialized** (:meth:`EventStore.lock`: PostgreSQL's transaction-scoped
  advisory lock, SQLite's one write lock), so positions are handed out in commit order: a
  reader that has seen position N has seen every event before it. That is what lets a
  projection record one position and apply each event exactly once, and a rebuild catch up
  to the live position. The price is one appender at a time, ample for billing's rate.
* Events are read upcast to the version the code knows (:mod:`tributary.billing.upcasting`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing.models import EventRow
from tributary.billing.upcasting import Upcasters
from tributary.messaging.db import as_utc, now

APPEND_LOCK = 0x42494C4C494E47  # "BILLING": the advisory lock appends hold on PostgreSQL


class ConcurrencyConflict(Exception):
    """Another writer appended to the stream since the caller read it."""

    def __init__(self, stream_id: str, expected: int, actual: int | None) -> None:
        found = "moved on" if actual is None else f"is at version {actual}"
        super().__init__(f"stream {stream_id} {found}, expected version {expected}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class NewEvent:
    type: str
    data: dict[str, Any]
    schema_version: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredEvent:
    position: int
    event_id: str
    stream_id: str
    version: int
    type: str
    schema_version: int
    """The version of ``data`` as read (after upcasting), not necessarily as stored."""
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime


class EventStore:
    def __init__(self, upcasters: Upcasters, current_versions: Mapping[str, int]) -> None:
        self.upcasters = upcasters
        self.current_versions = dict(current_versions)

    def _read(self, row: EventRow) -> StoredEvent:
        wanted = self.current_versions.get(row.type, row.schema_version)
        data = row.data
        if row.schema_version != wanted:
            data = self.upcasters.upcast(row.type, row.schema_version, data, wanted)
        assert row.position is not None  # noqa: S101 -- a stored row has its position
        return StoredEvent(
            position=row.position,
            event_id=row.event_id,
            stream_id=row.stream_id,
            version=row.version,
            type=row.type,
            schema_version=wanted,
            data=data,
            metadata=dict(row.meta),
            recorded_at=as_utc(row.recorded_at),
        )

    async def read_stream(self, session: AsyncSession, stream_id: str) -> list[StoredEvent]:
        rows = await session.exec(
            select(EventRow)
            .where(col(EventRow.stream_id) == stream_id)
            .order_by(col(EventRow.version))
        )
        return [self._read(row) for row in rows.all()]

    async def read_all(
        self, session: AsyncSession, *, after: int = 0, limit: int = 500
    ) -> list[StoredEvent]:
        """Events after ``after`` in position order (a projection's catch-up, a rebuild)."""
        rows = await session.exec(
            select(EventRow)
            .where(col(EventRow.position) > after)
            .order_by(col(EventRow.position))
            .limit(limit)
        )
        return [self._read(row) for row in rows.all()]

    async def head(self, session: AsyncSession) -> int:
        """The last position written (0 for an empty store)."""
        last = await session.scalar(select(func.max(col(EventRow.position))))
        return int(last or 0)

    async def version_of(self, session: AsyncSession, stream_id: str) -> int:
        last = await session.scalar(
            select(func.max(col(EventRow.version))).where(col(EventRow.stream_id) == stream_id)
        )
        return int(last or 0)

    async def lock(self, session: AsyncSession) -> None:
        """Hold the append lock until the transaction ends: no other append can happen
        meanwhile. PostgreSQL: a transaction-scoped advisory lock; SQLite: its one write lock,
        taken by a statement that writes nothing."""
        if session.get_bind().dialect.name == "postgresql":
            statement = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=APPEND_LOCK)
        else:
            statement = text("UPDATE projection_state SET position = position WHERE 1 = 0")
        await session.exec(statement)  # type: ignore[call-overload]

    async def append(
        self,
        session: AsyncSession,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
    ) -> list[StoredEvent]:
        """Append ``events`` after ``expected_version`` (0: a new stream), in the session's
        transaction; :class:`ConcurrencyConflict` if the stream is elsewhere."""
        if not events:
            return []
        await self.lock(session)
        actual = await self.version_of(session, stream_id)
        if actual != expected_version:
            raise ConcurrencyConflict(stream_id, expected_version, actual)
        stamp = now()
        rows = [
            EventRow(
                event_id=str(uuid.uuid4()),
                stream_id=stream_id,
                version=expected_version + n,
                type=event.type,
                schema_version=event.schema_version,
                data=event.data,
                meta=event.metadata,
                recorded_at=stamp,
            )
            for n, event in enumerate(events, start=1)
        ]
        session.add_all(rows)
        try:
            await session.flush()
        except IntegrityError:  # a writer slipped in between the check and the insert
            raise ConcurrencyConflict(stream_id, expected_version, None) from None
        return [self._read(row) for row in rows]
