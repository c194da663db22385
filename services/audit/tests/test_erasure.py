"""user.erased in audit: recorded in the chain, DLQ swept; no entry holds a whole address or name.

On databases made by the service's migrations (append-only triggers included), SQLite and
PostgreSQL alike.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from tributary.audit import chain
from tributary.audit.app import create_app
from tributary.audit.handlers import build_handlers
from tributary.audit.models import AuditEntry
from tributary.contracts.envelope import CloudEvent, new_event
from tributary.contracts.events import (
    EmailSentV1,
    Payload,
    UserCreatedV2,
    UserEmailChangedV1,
    UserErasedV1,
    WorkspaceCreatedV1,
)
from tributary.messaging.db import create_engine, session_factory
from tributary.messaging.testing import SweepRecorder
from tributary.messaging.uow import UnitOfWork
from tributary.service.migrations import upgrade
from tributary.testkit.infra import create_postgres_database, drop_postgres_database

MIGRATIONS = Path(create_app.__code__.co_filename).parent / "migrations"
USER = "usr_erase0123456789"
ADDRESS = "zelda.quill@example.com"
NEW_ADDRESS = "zq@example.org"
GIVEN, FAMILY = "Zelda", "Quillfeather"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    name = ""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.sqlite'}"
    else:
        server = request.getfixturevalue("postgres").url
        name = f"t_audit_erase_{uuid.uuid4().hex[:12]}"
        url = await create_postgres_database(server, name)
    await upgrade(MIGRATIONS, url)
    engine = create_engine(url)
    yield engine
    await engine.dispose()
    if name:
        await drop_postgres_database(request.getfixturevalue("postgres").url, name)


def event(routing_key: str, data: Payload) -> CloudEvent[Payload]:
    return new_event(
        routing_key=routing_key, source="/services/test", subject=f"users/{USER}", data=data
    )


def the_users_events() -> list[CloudEvent[Payload]]:
    return [
        event(
            "user.created.v2",
            UserCreatedV2(
                user_id=USER,
                email=ADDRESS,
                given_name=GIVEN,
                family_name=FAMILY,
                plan="free",
                locale="en-GB",
                created_at=NOW,
            ),
        ),
        event(
            "user.email_changed.v1",
            UserEmailChangedV1(
                user_id=USER, old_email=ADDRESS, new_email=NEW_ADDRESS, changed_at=NOW
            ),
        ),
        event(
            "workspace.created.v1",
            WorkspaceCreatedV1(
                workspace_id="ws_0123456789",
                owner_id=USER,
                name=f"{GIVEN}'s workspace",
                created_at=NOW,
            ),
        ),
        event(
            "email.sent.v1",
            EmailSentV1(
                email_id="eml_0123456789",
                message_id="<abc@tributary.dev>",
                to=NEW_ADDRESS,
                template="welcome",
                user_id=USER,
                sent_at=NOW,
            ),
        ),
    ]


async def handle(
    engine: AsyncEngine, events: list[CloudEvent[Payload]], key: bytes | None, sweeps: Any
) -> None:
    handlers = build_handlers(key)
    for one in events:
        async with UnitOfWork(session_factory(engine)(), "/services/audit", sweeper=sweeps) as uow:
            await handlers[type(one.data)](one, uow)
            await uow.commit()


@pytest.mark.parametrize("key", [None, b"audit-key"], ids=["masked", "keyed-hash"])
async def test_the_erasure_is_recorded_the_dlq_swept_and_the_chain_still_verifies(
    engine: AsyncEngine, key: bytes | None
) -> None:
    sweeps = SweepRecorder()
    erasure = event("user.erased.v1", UserErasedV1(user_id=USER, erased_at=NOW))
    await handle(engine, [*the_users_events(), erasure], key, sweeps)
    await handle(engine, [erasure], key, sweeps)  # a forced replay appends; nothing breaks

    async with session_factory(engine)() as session:
        entries = list((await session.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))).all())
        report = await chain.verify(session)
    assert report.ok, report
    assert report.entries == 6
    assert [e.data_type for e in entries][-2:] == ["user.erased.v1", "user.erased.v1"]
    assert entries[-1].data == {"user_id": USER, "erased_at": "2026-03-01T12:00:00Z"}
    assert sweeps.swept == [(USER,), (USER,)]
    stored = " ".join(repr(e.model_dump()) for e in entries)
    for whole in (ADDRESS, NEW_ADDRESS, GIVEN, FAMILY, f"{GIVEN} {FAMILY}"):
        assert whole not in stored
