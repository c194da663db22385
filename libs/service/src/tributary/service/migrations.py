"""Alembic, shared: services run their migrations at start-up; ``env.py`` is one call."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool
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


def create_runtime_tables() -> None:
    """In a service's first migration: the messaging runtime's outbox, inbox and lease tables."""
    from tributary.messaging.db import RUNTIME_TABLES

    bind = context.get_bind()
    for table in RUNTIME_TABLES:
        table.create(bind)


def drop_runtime_tables() -> None:
    from tributary.messaging.db import RUNTIME_TABLES

    bind = context.get_bind()
    for table in reversed(RUNTIME_TABLES):
        table.drop(bind)
