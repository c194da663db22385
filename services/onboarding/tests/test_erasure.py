"""user.erased in onboarding: the workspace, outbox rows and dead letters about the user go."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel, select

from tributary.contracts.envelope import CloudEvent, new_event
from tributary.contracts.events import UserCreatedV2, UserErasedV1
from tributary.messaging.db import OutboxRow, create_engine, session_factory
from tributary.messaging.erasure import ErasedUser
from tributary.messaging.testing import SweepRecorder
from tributary.messaging.uow import UnitOfWork
from tributary.onboarding.handlers import on_user_created, on_user_erased
from tributary.onboarding.models import Workspace
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

ERASED = "usr_erase0123456789"
KEPT = "usr_keep00123456789"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    name = ""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'onboarding.db'}"
    else:
        server: Found = request.getfixturevalue("postgres")
        name = f"t_onb_{uuid.uuid4().hex[:12]}"
        url = await create_postgres_database(server.url, name)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)
    yield engine
    await engine.dispose()
    if name:
        await drop_postgres_database(request.getfixturevalue("postgres").url, name)


def user_created(user_id: str, given_name: str = "Zelda") -> CloudEvent[UserCreatedV2]:
    return new_event(
        routing_key="user.created.v2",
        source="/services/identity",
        data=UserCreatedV2(
            user_id=user_id,
            email=f"{given_name.lower()}@example.com",
            given_name=given_name,
            family_name="Quill",
            plan="free",
            locale="en-GB",
            created_at=datetime.now(UTC),
        ),
    )


def user_erased(user_id: str) -> CloudEvent[UserErasedV1]:
    return new_event(
        routing_key="user.erased.v1",
        source="/services/identity",
        data=UserErasedV1(user_id=user_id, erased_at=datetime.now(UTC)),
    )


async def handle(engine: AsyncEngine, event: CloudEvent[object], sweeps: SweepRecorder) -> None:
    """As the runtime does: one unit of work, committed after the handler."""
    handler = on_user_erased if event.routing_key.startswith("user.erased") else on_user_created
    async with UnitOfWork(session_factory(engine)(), "/services/onboarding", sweeper=sweeps) as uow:
        await handler(event, uow)  # type: ignore[arg-type]
        await uow.commit()


async def stored(engine: AsyncEngine) -> tuple[list[str], list[str], list[str]]:
    """Workspace owners, outbox bodies, erased user ids."""
    async with session_factory(engine)() as session:
        owners = list((await session.exec(select(Workspace.owner_id))).all())
        bodies = [b.decode() for b in (await session.exec(select(OutboxRow.body))).all()]
        erased = list((await session.exec(select(ErasedUser.user_id))).all())
    return owners, bodies, erased


async def test_erasure_deletes_the_workspace_and_its_events_and_a_replay_changes_nothing(
    engine: AsyncEngine,
) -> None:
    sweeps = SweepRecorder()
    await handle(engine, user_created(ERASED, "Zelda"), sweeps)
    await handle(engine, user_created(KEPT, "Kept"), sweeps)
    owners, bodies, _ = await stored(engine)
    assert sorted(owners) == sorted([ERASED, KEPT])
    assert any("Zelda's workspace" in b for b in bodies)

    erasure = user_erased(ERASED)
    await handle(engine, erasure, sweeps)
    await handle(engine, erasure, sweeps)  # redelivered, or replayed by an operator

    owners, bodies, erased = await stored(engine)
    assert owners == [KEPT]
    assert erased == [ERASED]
    assert not any(ERASED in b or "Zelda" in b for b in bodies)
    assert any("Kept's workspace" in b for b in bodies)
    assert sweeps.swept == [(ERASED,), (ERASED,)]  # the DLQ is swept on every delivery


async def test_a_sign_up_arriving_after_the_erasure_makes_nothing(engine: AsyncEngine) -> None:
    sweeps = SweepRecorder()
    await handle(engine, user_erased(ERASED), sweeps)  # events are not ordered
    await handle(engine, user_created(ERASED), sweeps)
    owners, bodies, erased = await stored(engine)
    assert owners == []
    assert [json.loads(b)["type"] for b in bodies] == []
    assert erased == [ERASED]
