from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel, select

from tributary.email.handlers import Delivery, on_user_created
from tributary.email.models import EmailRecord
from tributary.messaging.db import RUNTIME_TABLES, create_engine, session_factory
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database
from tributary.testkit.waiting import eventually

from .test_handlers import user_created


class GatedMailer:
    """Holds every send until ``release`` is set, so a second consumer can race the first."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.sent: list[EmailMessage] = []

    async def send(self, message: EmailMessage) -> None:
        self.started.set()
        await self.release.wait()
        self.sent.append(message)


@pytest.fixture
async def engine(postgres: Found) -> AsyncIterator[AsyncEngine]:
    name = f"t_email_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(postgres.url, name)
    engine = create_engine(url)
    names = ("emails", "recipients", "welcome_sends", "tributary_erased_users")
    tables = [SQLModel.metadata.tables[t] for t in names] + RUNTIME_TABLES
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: SQLModel.metadata.create_all(c, tables=tables))
    yield engine
    await engine.dispose()
    await drop_postgres_database(postgres.url, name)


async def wait_for_a_lock_wait(engine: AsyncEngine, timeout: float = 20.0) -> None:
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )

    async def waiting_on_a_lock() -> bool:
        async with engine.connect() as conn:
            return bool((await conn.execute(query)).scalar_one())

    await eventually(
        waiting_on_a_lock,
        timeout=timeout,
        what="the second consumer waiting on the first one's row",
        poll=0.02,
    )


async def test_two_consumers_racing_for_one_welcome_on_postgresql_send_it_once(
    engine: AsyncEngine,
) -> None:
    mailer = GatedMailer()
    delivery = Delivery(mailer=mailer, from_address="no-reply@tributary.dev")
    sessions = session_factory(engine)
    async with (
        UnitOfWork(sessions(), "/services/email") as first,
        UnitOfWork(sessions(), "/services/email") as second,
    ):
        # the same user announced twice under two event ids: the inbox cannot tell them apart
        sending = asyncio.create_task(on_user_created(user_created(), first, delivery))
        await mailer.started.wait()
        racing = asyncio.create_task(on_user_created(user_created(), second, delivery))
        await wait_for_a_lock_wait(engine)  # the second blocks on the first's logical key

        mailer.release.set()
        await sending
        await first.commit()
        with pytest.raises(IntegrityError):
            await racing
        await second.rollback()

        # the runtime retries the second delivery: it now finds the email and sends nothing
        await on_user_created(user_created(), second, delivery)
        await second.commit()

    assert len(mailer.sent) == 1
    async with sessions() as session:
        assert [r.status for r in (await session.exec(select(EmailRecord))).all()] == ["sent"]
