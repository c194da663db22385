"""Databases for billing (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing.app import create_app
from tributary.messaging.db import create_engine, session_factory
from tributary.service.migrations import upgrade
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

MIGRATIONS = Path(create_app.__code__.co_filename).parent / "migrations"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: an SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
        return
    server: Found = request.getfixturevalue("postgres")
    name = f"t_billing_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(server.url, name)
    try:
        yield url
    finally:
        await drop_postgres_database(server.url, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The database of ``database_url`` brought to head by billing's migrations."""
    await upgrade(MIGRATIONS, database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)
