"""Fixtures: a fresh database per test (SQLite file or PostgreSQL database), isolated topology."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Field, SQLModel

from tributary.contracts.envelope import CloudEvent
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.testing import OutcomeRecorder
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.infra import Found, fresh_database


class Thing(SQLModel, table=True):
    """The one domain row the test handlers write."""

    __tablename__ = "test_things"

    event_id: str = Field(primary_key=True)
    user_id: str


async def on_user_created(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
    """The test handler: one ``Thing`` per event."""
    uow.session.add(Thing(event_id=event.id, user_id=event.data.user_id))


async def user_created_round_trip(bus: Bus, outcomes: OutcomeRecorder) -> None:
    """Commit one ``user.created`` through ``bus``'s outbox and wait until it is handled."""
    async with bus.unit_of_work() as uow:
        event = uow.outbox.add(
            UserCreatedV2(
                user_id="usr_0123456789",
                email="ada@example.com",
                given_name="Ada",
                family_name="Lovelace",
                plan="free",
                locale="en-GB",
                created_at=datetime.now(UTC),
            )
        )
        await uow.commit()
    await outcomes.wait_until_handled(event.id)


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
