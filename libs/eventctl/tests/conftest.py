"""Fixtures: the broker, isolated topology names, and fresh databases."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import isolated_settings
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database


@pytest.fixture
def broker_url(rabbitmq: Found) -> str:
    return rabbitmq.url


@pytest.fixture
def settings(broker_url: str) -> MessagingSettings:
    """Every exchange and queue of the test under a fresh name prefix."""
    return isolated_settings(broker_url)


@pytest.fixture
async def consumer_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A consuming service's database (inbox): an SQLite file."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'consumer.db'}")
    await create_runtime_tables(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
async def producer_database_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[str]:
    """A fresh producer database with the runtime's tables: an SQLite file or PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'producer.db'}"
        await _create_tables(url)
        yield url
        return
    server: Found = request.getfixturevalue("postgres")
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(server.url, name)
    await _create_tables(url)
    yield url
    await drop_postgres_database(server.url, name)


async def _create_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        await create_runtime_tables(engine)
    finally:
        await engine.dispose()
