"""Fixtures: a fresh database per test (SQLite file or PostgreSQL database), isolated topology."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Field, SQLModel

from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.testkit.infra import Found, fresh_database


class Thing(SQLModel, table=True):
    """The one domain row the test handlers write."""

    __tablename__ = "test_things"

    event_id: str = Field(primary_key=True)
    user_id: str


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: an SQLite file, or a new PostgreSQL database."""
    async with fresh_database(request, request.param, tmp_path, "test") as url:
        yield url


async def prepared_engine(database_url: str) -> AsyncEngine:
    """An engine on ``database_url`` with the runtime's tables and ``test_things``."""
    engine = create_engine(database_url)
    await create_runtime_tables(engine)
    async with engine.begin() as conn:
        await conn.run_sync(
            lambda c: SQLModel.metadata.create_all(
                c, tables=[SQLModel.metadata.tables["test_things"]]
            )
        )
    return engine


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = await prepared_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def broker_url(rabbitmq: Found) -> str:
    return rabbitmq.url
