"""user.email_changed in any order: the recipient ends on the address changed last.

On databases made by the service's migrations, SQLite and PostgreSQL alike; each delivery in
its own transaction, as the runtime handles them.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.envelope import new_event
from tributary.contracts.events import UserCreatedV2, UserEmailChangedV1
from tributary.email.handlers import (
    Delivery,
    RecipientNotYetKnown,
    on_user_created,
    on_user_email_changed,
)
from tributary.email.models import Recipient
from tributary.messaging.db import create_engine
from tributary.messaging.uow import UnitOfWork
from tributary.service.migrations import alembic_config, upgrade
from tributary.service.testing import FakeUnitOfWork

from .conftest import MIGRATIONS
from .test_handlers import FakeMailer, user_created
from .test_racing_consumers import wait_for_a_lock_wait

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def a_user_id() -> str:
    return f"usr_{uuid.uuid4().hex}"


def changed(user_id: str, new_email: str, changed_at: datetime) -> Any:
    return new_event(
        routing_key="user.email_changed.v1",
        source="/services/identity",
        data=UserEmailChangedV1(
            user_id=user_id,
            old_email="before@example.com",
            new_email=new_email,
            changed_at=changed_at,
        ),
    )


async def handle(sessions: async_sessionmaker[AsyncSession], event: Any) -> bool:
    """One delivery in one transaction; False when it failed and was rolled back for a retry."""
    delivery = Delivery(mailer=FakeMailer(), from_address="no-reply@tributary.dev")
    async with UnitOfWork(sessions(), "/services/email") as uow:
        try:
            if isinstance(event.data, UserCreatedV2):
                await on_user_created(event, uow, delivery)
            else:
                await on_user_email_changed(event, uow)
        except RecipientNotYetKnown:
            await uow.rollback()
            return False
        await uow.commit()
    return True


async def address_of(sessions: async_sessionmaker[AsyncSession], user_id: str) -> str:
    async with sessions() as session:
        recipient = await session.get(Recipient, user_id)
        assert recipient is not None
        return recipient.email


async def deliver_until_handled(
    sessions: async_sessionmaker[AsyncSession], events: list[Any]
) -> int:
    """Like the runtime: a delivery that failed comes back later, behind the others."""
    queue, attempts = list(events), 0
    while queue:
        attempts += 1
        assert attempts <= len(events) ** 2, "deliveries kept failing"
        event = queue.pop(0)
        if not await handle(sessions, event):
            queue.append(event)
    return attempts


async def test_an_older_change_after_a_newer_one_leaves_the_newer_address(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user = a_user_id()
    assert await handle(sessions, user_created(user, email="first@example.com"))

    assert await handle(sessions, changed(user, "newer@example.com", T0 + timedelta(minutes=5)))
    assert await handle(sessions, changed(user, "older@example.com", T0 + timedelta(minutes=1)))

    assert await address_of(sessions, user) == "newer@example.com"


async def test_changes_in_their_own_order_end_on_the_last(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user = a_user_id()
    assert await handle(sessions, user_created(user, email="first@example.com"))

    assert await handle(sessions, changed(user, "older@example.com", T0 + timedelta(minutes=1)))
    assert await address_of(sessions, user) == "older@example.com"
    assert await handle(sessions, changed(user, "newer@example.com", T0 + timedelta(minutes=5)))

    assert await address_of(sessions, user) == "newer@example.com"


async def test_a_redelivered_change_and_a_redelivered_user_created_change_nothing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user = a_user_id()
    created = user_created(user, email="first@example.com")
    newer = changed(user, "newer@example.com", T0 + timedelta(minutes=5))
    for event in (created, newer, changed(user, "older@example.com", T0), newer, created):
        assert await handle(sessions, event)

    assert await address_of(sessions, user) == "newer@example.com"
    async with sessions() as session:
        recipient = await session.get(Recipient, user)
        assert recipient is not None
        assert recipient.email_changed_at == T0 + timedelta(minutes=5)  # aware UTC, read back


async def test_a_change_before_user_created_is_retried_and_then_applied(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user = a_user_id()
    change = changed(user, "newer@example.com", T0 + timedelta(minutes=5))

    assert not await handle(sessions, change)  # RecipientNotYetKnown: the runtime retries it
    assert await handle(sessions, user_created(user, email="first@example.com"))
    assert await address_of(sessions, user) == "first@example.com"
    assert await handle(sessions, change)

    assert await address_of(sessions, user) == "newer@example.com"


async def test_a_welcome_sent_late_goes_to_the_changed_address(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    user = a_user_id()
    created = user_created(user, email="first@example.com")
    mailer = FakeMailer()
    async with sessions() as session:  # a replay rebuilds the projection and sends nothing
        replay = FakeUnitOfWork(session, is_replay=True, suppress_side_effects=True)
        await on_user_created(created, cast(Any, replay), Delivery(mailer, "x@tributary.dev"))
        await session.commit()
    assert await handle(sessions, changed(user, "newer@example.com", T0))

    async with sessions() as session:  # eventctl replay ... --force
        forced = FakeUnitOfWork(session, is_replay=True)
        await on_user_created(created, cast(Any, forced), Delivery(mailer, "x@tributary.dev"))
        await session.commit()

    [welcome] = mailer.sent
    assert welcome["To"] == "newer@example.com"


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
@pytest.mark.parametrize("first_holds", ["older", "newer"])
async def test_two_changes_applied_at_once_on_postgresql_end_on_the_later(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], first_holds: str
) -> None:
    user = a_user_id()
    assert await handle(sessions, user_created(user, email="first@example.com"))
    older = changed(user, "older@example.com", T0 + timedelta(minutes=1))
    newer = changed(user, "newer@example.com", T0 + timedelta(minutes=5))
    first_event, second_event = (older, newer) if first_holds == "older" else (newer, older)

    async with (
        UnitOfWork(sessions(), "/services/email") as first,
        UnitOfWork(sessions(), "/services/email") as second,
    ):
        await on_user_email_changed(first_event, first)  # holds the row lock, not committed
        racing = asyncio.create_task(on_user_email_changed(second_event, second))
        await wait_for_a_lock_wait(engine)  # the second waits for the first's row
        await first.commit()
        await racing  # decides on the row as the first committed it
        await second.commit()

    assert await address_of(sessions, user) == "newer@example.com"


async def test_migrations_add_and_remove_the_change_time(database: str) -> None:
    async def columns() -> set[str]:
        engine = create_engine(database)
        try:
            async with engine.connect() as conn:
                found = await conn.run_sync(lambda c: inspect(c).get_columns("recipients"))
        finally:
            await engine.dispose()
        return {column["name"] for column in found}

    assert "email_changed_at" in await columns()
    await asyncio.to_thread(command.downgrade, alembic_config(MIGRATIONS, database), "0002")
    assert "email_changed_at" not in await columns()
    await upgrade(MIGRATIONS, database)
    assert "email_changed_at" in await columns()


# ``changed_at`` as the identity service may write it: microseconds apart, in any UTC offset
offsets = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # one database, a user each
)
@given(
    ticks=st.lists(st.integers(0, 10**7), min_size=1, max_size=4, unique=True),
    zones=st.lists(offsets, min_size=4, max_size=4),
    data=st.data(),
)
async def test_any_delivery_order_ends_on_the_address_changed_last(
    sessions: async_sessionmaker[AsyncSession],
    ticks: list[int],
    zones: list[timezone],
    data: st.DataObject,
) -> None:
    user = a_user_id()
    changes = [
        changed(user, f"a{i}@example.com", (T0 + timedelta(microseconds=t)).astimezone(zone))
        for i, (t, zone) in enumerate(zip(ticks, zones, strict=False))
    ]
    events = [user_created(user, email="first@example.com"), *changes]
    order = data.draw(st.permutations(events), label="delivery order")
    redelivered = data.draw(st.lists(st.sampled_from(events), max_size=3), label="redelivered")
    for event in redelivered:  # a redelivery may come at any point after the first delivery
        after = order.index(event) + 1
        order.insert(data.draw(st.integers(after, len(order)), label="redelivered at"), event)

    await deliver_until_handled(sessions, order)

    last = changes[ticks.index(max(ticks))].data.new_email
    assert await address_of(sessions, user) == last
