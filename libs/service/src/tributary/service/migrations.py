"""Alembic, shared: services run their migrations at start-up; ``env.py`` is one call."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context, op
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    pool,
)
from sqlalchemy.engine import Connection

from tributary.messaging.db import create_engine


def alembic_config(script_location: Path, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def upgrade(script_location: Path, url: str) -> None:
    """``alembic upgrade head`` for ``url`` (in a worker thread: alembic is synchronous)."""
    await asyncio.to_thread(command.upgrade, alembic_config(script_location, url), "head")


def _configure(connection: Connection, metadata: MetaData) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_env(metadata: MetaData) -> None:
    """The whole body of a service's ``migrations/env.py``."""
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("sqlalchemy.url is not set")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return

    async def online() -> None:
        engine = create_engine(url, poolclass=pool.NullPool)
        async with engine.connect() as connection:
            await connection.run_sync(_configure, metadata)
        await engine.dispose()

    asyncio.run(online())


def _runtime_tables_v1(metadata: MetaData) -> list[Table]:
    """The runtime's tables as a service's first migration made them (frozen: later changes
    to the models arrive through later revisions, so old and new databases end up alike)."""
    outbox = Table(
        "tributary_outbox",
        metadata,
        Column(
            "seq",
            BigInteger().with_variant(Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        Column("event_id", String(200), nullable=False, unique=True),
        Column("routing_key", String(200), nullable=False),
        Column("body", LargeBinary(), nullable=False),
        Column("trace_headers", String(), nullable=False),
        Column("correlation_id", String(200), nullable=True),
        Column("created_at", DateTime(), nullable=False),
        Column("published_at", DateTime(), nullable=True),
        Column("attempts", Integer(), nullable=False),
        Column("next_attempt_at", DateTime(), nullable=True),
        Column("last_error", String(1000), nullable=True),
        Index("ix_tributary_outbox_pending", "published_at", "seq"),
    )
    inbox = Table(
        "tributary_inbox",
        metadata,
        Column("key", String(400), primary_key=True),
        Column("payload_hash", String(64), nullable=False),
        Column("event_id", String(200), nullable=False),
        Column("event_type", String(200), nullable=False),
        Column("processed_at", DateTime(), nullable=False),
    )
    lease = Table(
        "tributary_outbox_lease",
        metadata,
        Column("name", String(100), primary_key=True),
        Column("owner", String(100), nullable=False),
        Column("expires_at", DateTime(), nullable=False),
    )
    return [outbox, inbox, lease]


def create_runtime_tables() -> None:
    """In a service's first migration: the messaging runtime's outbox, inbox and lease tables."""
    bind = context.get_bind()
    for table in _runtime_tables_v1(MetaData()):
        table.create(bind)


def drop_runtime_tables() -> None:
    bind = context.get_bind()
    for table in reversed(_runtime_tables_v1(MetaData())):
        table.drop(bind)


def park_outbox_rows() -> None:
    """Runtime schema 2: parked outbox rows (``parked_at``), the relay's claim index that skips
    them, and the inbox index the retention purge reads."""
    op.add_column("tributary_outbox", Column("parked_at", DateTime(), nullable=True))
    op.drop_index("ix_tributary_outbox_pending", table_name="tributary_outbox")
    op.create_index(
        "ix_tributary_outbox_waiting", "tributary_outbox", ["published_at", "parked_at", "seq"]
    )
    op.create_index("ix_tributary_inbox_processed_at", "tributary_inbox", ["processed_at"])


def unpark_outbox_rows() -> None:
    """Undo :func:`park_outbox_rows` (parked rows become ordinary waiting rows again)."""
    op.drop_index("ix_tributary_inbox_processed_at", table_name="tributary_inbox")
    op.drop_index("ix_tributary_outbox_waiting", table_name="tributary_outbox")
    op.create_index("ix_tributary_outbox_pending", "tributary_outbox", ["published_at", "seq"])
    with op.batch_alter_table("tributary_outbox") as batch:
        batch.drop_column("parked_at")


def schedule_outbox_rows() -> None:
    """Runtime schema 3: scheduled outbox rows (``deliver_at``, not before), and the claim
    index ``(published_at, parked_at, deliver_at, seq)`` that reads rows to publish at once
    in ``seq`` order and scheduled rows by due time, never the rows not due yet."""
    op.drop_index("ix_tributary_outbox_waiting", table_name="tributary_outbox")
    op.add_column("tributary_outbox", Column("deliver_at", DateTime(), nullable=True))
    op.create_index(
        "ix_tributary_outbox_waiting",
        "tributary_outbox",
        ["published_at", "parked_at", "deliver_at", "seq"],
    )


def unschedule_outbox_rows() -> None:
    """Undo :func:`schedule_outbox_rows` (scheduled rows not yet published become due at once)."""
    op.drop_index("ix_tributary_outbox_waiting", table_name="tributary_outbox")
    with op.batch_alter_table("tributary_outbox") as batch:
        batch.drop_column("deliver_at")
    op.create_index(
        "ix_tributary_outbox_waiting", "tributary_outbox", ["published_at", "parked_at", "seq"]
    )


def create_erased_users() -> None:
    """``tributary_erased_users`` (``tributary.messaging.erasure.ErasedUser``): the ids of
    erased users, for services that must ignore late events about them."""
    op.create_table(
        "tributary_erased_users",
        Column("user_id", String(60), primary_key=True),
        Column("erased_at", DateTime(), nullable=False),
    )


def drop_erased_users() -> None:
    op.drop_table("tributary_erased_users")
