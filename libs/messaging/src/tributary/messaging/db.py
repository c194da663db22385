"""Database engines (SQLite and PostgreSQL) and the runtime's own tables: outbox and inbox."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, LargeBinary, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.messaging import sqlite_driver


def utcnow() -> datetime:
    """Naive UTC, for the runtime's own tables: stored the same way on SQLite and PostgreSQL."""
    return datetime.now(UTC).replace(tzinfo=None)


def now() -> datetime:
    """Aware UTC, for domain tables (SQLModel stores ``datetime`` fields as aware UTC)."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC in and out on every dialect (SQLite keeps no offset: stored UTC, read as UTC).

    Unlike SQLModel's own ``datetime`` mapping it takes naive values as UTC instead of failing.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def _ts(*, nullable: bool, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(DateTime(), nullable=nullable, index=index))


class OutboxRow(SQLModel, table=True):
    """An event committed with the domain change that caused it, waiting for the relay."""

    __tablename__ = "tributary_outbox"
    # the relay's claims read this index in order and skip no parked or not-yet-due rows:
    # rows to publish at once (deliver_at NULL) in seq order, scheduled rows due by now in
    # (deliver_at, seq) order, and the next scheduled row to come due; the purge and the
    # gauges use its leading column
    __table_args__ = (
        Index("ix_tributary_outbox_waiting", "published_at", "parked_at", "deliver_at", "seq"),
    )

    seq: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    # unique and given by the writer: SQLAlchemy sorts a multi-row INSERT ... RETURNING by it,
    # so on SQLite the rows of a transaction are inserted in one statement, not one each
    event_id: str = Field(max_length=200, unique=True, sa_column_kwargs={"insert_sentinel": True})
    routing_key: str = Field(max_length=200)
    body: bytes = Field(sa_column=Column(LargeBinary(), nullable=False))
    trace_headers: str = Field(default="{}")
    """W3C trace context of the request or event that wrote the row (JSON)."""
    correlation_id: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(), nullable=False)
    )
    published_at: datetime | None = _ts(nullable=True)
    attempts: int = 0
    next_attempt_at: datetime | None = _ts(nullable=True)
    last_error: str | None = Field(default=None, max_length=1000)
    parked_at: datetime | None = _ts(nullable=True)
    """Set when the relay gave up after its bounded attempts: the row waits for an operator
    (``eventctl outbox parked`` / ``eventctl outbox resend``) and blocks nothing behind it."""
    deliver_at: datetime | None = _ts(nullable=True)
    """Not before (naive UTC): the relay publishes the row once this time has come. ``None``
    for a row to publish at once (``Outbox.add`` stores no time that has already passed)."""


class InboxRow(SQLModel, table=True):
    """An event this service has handled: the key it is deduplicated on, and its payload hash."""

    __tablename__ = "tributary_inbox"
    __table_args__ = (Index("ix_tributary_inbox_processed_at", "processed_at"),)  # the purge

    key: str = Field(primary_key=True, max_length=400)
    payload_hash: str = Field(max_length=64)
    event_id: str = Field(max_length=200)
    event_type: str = Field(max_length=200)
    processed_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(), nullable=False)
    )


class OutboxLease(SQLModel, table=True):
    """Single-writer lease for relays sharing an SQLite file (PostgreSQL uses SKIP LOCKED)."""

    __tablename__ = "tributary_outbox_lease"

    name: str = Field(primary_key=True, max_length=100)
    owner: str = Field(max_length=100)
    expires_at: datetime = Field(sa_column=Column(DateTime(), nullable=False))


RUNTIME_TABLES = [
    SQLModel.metadata.tables[name]
    for name in ("tributary_outbox", "tributary_inbox", "tributary_outbox_lease")
]


SQLITE_SYNCHRONOUS_ENV = "TRIBUTARY_SQLITE_SYNCHRONOUS"
SQLITE_SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


def sqlite_synchronous(level: str | None = None) -> str:
    """``PRAGMA synchronous``: ``level``, else ``$TRIBUTARY_SQLITE_SYNCHRONOUS``, else FULL.

    The consumer acks a message after its transaction commits, so the commit must be on disk:
    with WAL, FULL syncs the log at every commit and survives power loss and OS crashes;
    NORMAL syncs only at checkpoints, so the last commits before a power loss can vanish after
    their messages were acked (a process crash loses nothing with either). Group commit spreads
    the sync over a batch; ``bench/sqlite_sync_bench.py`` measures the difference.
    """
    chosen = (level or os.environ.get(SQLITE_SYNCHRONOUS_ENV) or "FULL").strip().upper()
    if chosen not in SQLITE_SYNCHRONOUS_LEVELS:
        raise ValueError(
            f"{SQLITE_SYNCHRONOUS_ENV}={chosen!r}: expected one of "
            f"{', '.join(SQLITE_SYNCHRONOUS_LEVELS)}"
        )
    return chosen


def _sqlite_pragmas(synchronous: str) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")  # one of the checked levels
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``sqlite+aiosqlite:///…`` or ``postgresql+asyncpg://…``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        pragmas = _sqlite_pragmas(sqlite_synchronous())
        kwargs.setdefault("module", sqlite_driver.dbapi())  # one thread round trip a statement
        if "poolclass" not in kwargs:  # a NullPool (migrations) keeps no connections
            # the most recently returned connection first: a steady flow of events reuses one
            # or two, not every connection a burst of API reads once opened. Each has its own
            # thread (its own malloc arena) and its own statement cache, which a FIFO pool's
            # rotation warmed up one after the other (``bench/rss_bench.py``)
            kwargs.setdefault("pool_use_lifo", True)
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine.sync_engine, "connect", pragmas)
        return engine
    if "poolclass" not in kwargs:  # a NullPool (migrations) takes no sizing arguments
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 10)
    # no pool_pre_ping: it costs a round trip per transaction, and a connection that died with
    # the server fails its transaction, which the consumer retries and the relay backs off from.
    # Bounded waits: a server that vanished without closing the socket must not hang a worker
    # (connect within 10 s, each statement within 60 s).
    kwargs["connect_args"] = {
        "timeout": 10,
        "command_timeout": 60,
        **kwargs.get("connect_args", {}),
    }
    return create_async_engine(url, **kwargs)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def create_runtime_tables(engine: AsyncEngine) -> None:
    """Create the outbox/inbox tables (tests and quick starts; services use migrations)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: SQLModel.metadata.create_all(c, tables=RUNTIME_TABLES))
