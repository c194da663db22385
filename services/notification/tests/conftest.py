"""Databases (SQLite and PostgreSQL, brought to head by the service's migrations) and events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.messaging.db import create_engine, session_factory
from tributary.notification.app import create_app
from tributary.service.migrations import upgrade
from tributary.testkit.infra import fresh_database

MIGRATIONS = Path(create_app.__code__.co_filename).parent / "migrations"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: an SQLite file or a new PostgreSQL database."""
    async with fresh_database(request, request.param, tmp_path, "notification") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'notification.db'}"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The database of ``database_url`` brought to head by the service's migrations."""
    await upgrade(MIGRATIONS, database_url)
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)
