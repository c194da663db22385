"""Replay published outbox rows of some types and a time range to ONE consumer's work queue.

The producer keeps published rows for the replay window (``tributary_outbox``). Replayed
copies go through the default exchange straight to the named queue, so no other consumer
sees them, and carry ``x-tributary-replay: 1`` so the consumer's handlers see
``uow.is_replay`` and suppress irreversible side effects. The table is only read.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractConnection
from sqlalchemy import ColumnElement, func
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from sqlmodel import col, select

from tributary.eventctl.broker import require_queue
from tributary.eventctl.entries import type_matches
from tributary.eventctl.progress import Pace, Stopped
from tributary.eventctl.report import Counts
from tributary.messaging import headers as h
from tributary.messaging.db import OutboxRow, create_engine, session_factory
from tributary.messaging.publisher import Publisher, event_message

REPLAY_FORCED = "x-tributary-replay-forced"
"""Set by ``--force``: the operator asks for the irreversible side effects as well."""

_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


class DatabaseMissing(RuntimeError):
    """The ``--database`` URL names an SQLite file that does not exist."""


def database_engine(url: str) -> AsyncEngine:
    """A read engine for a producer's database; plain ``postgresql://``/``sqlite://`` work too."""
    scheme, sep, rest = url.partition("://")
    url = f"{_DRIVERS.get(scheme, scheme)}{sep}{rest}"
    parsed = make_url(url)
    # SQLite would create an empty file: a typo must not look like "nothing to replay"
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise DatabaseMissing(f"no SQLite database at {parsed.database!r}")
    return create_engine(url, poolclass=NullPool)


def parse_time(value: str) -> datetime:
    """ISO-8601 (``2026-01-01``, ``2026-01-01T10:00:00Z``, …) as naive UTC like the table's."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


@dataclass(frozen=True)
class OutboxSelection:
    """Rows of any of ``types`` created in [``since``, ``until``)."""

    types: tuple[str, ...]
    since: datetime | None = None
    until: datetime | None = None

    def where(self, routing_keys: Sequence[str]) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = [col(OutboxRow.routing_key).in_(routing_keys)]
        if self.since is not None:
            clauses.append(col(OutboxRow.created_at) >= self.since)
        if self.until is not None:
            clauses.append(col(OutboxRow.created_at) < self.until)
        return clauses


def _app_id(body: bytes) -> str:
    """The producing service, from the envelope's ``source`` (``/services/identity``)."""
    try:
        source = json.loads(body).get("source")
    except (ValueError, AttributeError):
        return ""
    return source.removeprefix("/services/") if isinstance(source, str) else ""


def replay_headers(routing_key: str, *, force: bool, producer: str = "") -> dict[str, Any]:
    """The replay marks; ``producer`` (the service whose outbox it is) is named for the
    consumer's sender check, which trusts it on the operator's copies."""
    marks: dict[str, Any] = {h.REPLAY: "1", h.ROUTING_KEY: routing_key}
    if producer:
        marks[h.PRODUCER] = producer
    if force:
        marks[REPLAY_FORCED] = "1"
    return marks


async def replay_outbox(
    engine: AsyncEngine,
    connection: AbstractConnection,
    target: str,
    selection: OutboxSelection,
    *,
    force: bool,
    batch: int,
    dry_run: bool,
    pace: Pace | None = None,
) -> Counts:
    """Publish the selected published rows to the queue ``target``.

    Rows are read in commit order, but each batch's publishes are confirmed concurrently and
    the consumer batches and retries: the target gets no ordering guarantee. After Ctrl-C
    (``pace.stop``) the publishes under way are confirmed and no other is started.
    """
    pace = pace or Pace()
    await require_queue(connection, target)
    counts = Counts(duplicate=None)
    sessions = session_factory(engine)
    async with sessions() as session:
        known = (await session.exec(select(OutboxRow.routing_key).distinct())).all()
        keys = [k for k in known if any(type_matches(t, k) for t in selection.types)]
        published = col(OutboxRow.published_at).is_not(None)
        counted = select(func.count()).select_from(OutboxRow).where(*selection.where(keys))
        counts.selected = (await session.exec(counted.where(published))).one()
        counts.skipped = (await session.exec(counted.where(~published))).one()
    if dry_run or not counts.selected:
        return counts
    pace.total(counts.selected)

    async def send(row: OutboxRow) -> None:
        await pace.admit()
        await publisher.publish(
            "",
            target,
            event_message(
                row.body,
                event_id=row.event_id,
                routing_key=row.routing_key,
                app_id=_app_id(row.body),
                correlation_id=row.correlation_id,
                timestamp=row.created_at,
                headers=replay_headers(row.routing_key, force=force, producer=_app_id(row.body)),
            ),
        )
        pace.advance()

    publisher = Publisher(connection, in_flight=batch)
    await publisher.open()
    try:
        after = 0
        while True:
            async with sessions() as session:
                query = (
                    select(OutboxRow)
                    .where(*selection.where(keys), published, col(OutboxRow.seq) > after)
                    .order_by(col(OutboxRow.seq))
                    .limit(batch)
                )
                rows = (await session.exec(query)).all()
            if not rows or pace.stopping:
                counts.interrupted = pace.stopping
                return counts
            results = await asyncio.gather(
                *(send(row) for row in rows),
                return_exceptions=True,
            )
            for row, result in zip(rows, results, strict=True):
                if isinstance(result, Stopped):
                    counts.interrupted = True  # not started: a rerun replays it
                elif isinstance(result, BaseException):
                    counts.failed += 1
                    print(
                        f"eventctl: {row.event_id} not replayed ({type(result).__name__}: "
                        f"{result})",
                        file=sys.stderr,
                    )
                else:
                    counts.republished += 1
            if counts.failed or counts.interrupted:
                return counts  # stop: a rerun repeats what went through, the inbox dedupes it
            after = rows[-1].seq or after
    finally:
        await publisher.close()
