"""A database made by the email service's migrations, SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.email.app import create_app
from tributary.messaging.db import create_engine, session_factory
from tributary.service.migrations import upgrade
from tributary.testkit.infra import fresh_database

MIGRATIONS = Path(create_app.__code__.co_filename).parent / "migrations"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database brought to head by the email service's migrations."""
    async with fresh_database(request, request.param, tmp_path, "email") as url:
        await upgrade(MIGRATIONS, url)
        yield url


@pytest.fixture
async def engine(database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)
