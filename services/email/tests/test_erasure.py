"""user.erased in the email service, and the welcome email's window per address.

On databases made by the service's migrations, SQLite and PostgreSQL alike; each delivery in
its own transaction, as the runtime handles them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import inspect, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.envelope import CloudEvent, new_event
from tributary.contracts.events import UserEmailChangedV1, UserErasedV1
from tributary.email.handlers import (
    Delivery,
    address_hash,
    on_email_send,
    on_subscription_activated,
    on_user_created,
    on_user_email_changed,
    on_user_erased,
)
from tributary.email.models import ERASED_ADDRESS, EmailRecord, Recipient, WelcomeSend
from tributary.messaging.db import OutboxRow
from tributary.messaging.erasure import ErasedUser
from tributary.messaging.testing import SweepRecorder
from tributary.messaging.uow import UnitOfWork

from .test_handlers import FakeMailer, email_send, subscription_activated, user_created

KEY = b"test-address-key"
ERASED = "usr_erase0123456789"
KEPT = "usr_keep00123456789"
FIRST = "Zelda.Quill@Example.com"
SECOND = "zq.new@example.org"


class Service:
    """The handlers as the runtime calls them: one delivery, one committed transaction."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], window: timedelta) -> None:
        self.sessions = sessions
        self.mailer = FakeMailer()
        self.delivery = Delivery(
            mailer=self.mailer,
            from_address="no-reply@tributary.dev",
            address_key=KEY,
            welcome_window=window,
        )
        self.sweeps = SweepRecorder()

    async def handle(self, event: CloudEvent[Any]) -> None:
        name = event.routing_key.rsplit(".", 1)[0]
        async with UnitOfWork(self.sessions(), "/services/email", sweeper=self.sweeps) as uow:
            if name == "user.created":
                await on_user_created(event, uow, self.delivery)
            elif name == "subscription.activated":
                await on_subscription_activated(event, uow, self.delivery)
            elif name == "email.send":
                await on_email_send(event, uow, self.delivery)
            elif name == "user.email_changed":
                await on_user_email_changed(event, uow)
            else:
                await on_user_erased(event, uow)
            await uow.commit()

    def sent_to(self) -> list[str]:
        return [str(m["To"]) for m in self.mailer.sent]


def changed(user_id: str, old: str, new: str) -> CloudEvent[UserEmailChangedV1]:
    return new_event(
        routing_key="user.email_changed.v1",
        source="/services/identity",
        data=UserEmailChangedV1(
            user_id=user_id, old_email=old, new_email=new, changed_at=datetime.now(UTC)
        ),
    )


def erased(user_id: str) -> CloudEvent[UserErasedV1]:
    return new_event(
        routing_key="user.erased.v1",
        source="/services/identity",
        data=UserErasedV1(user_id=user_id, erased_at=datetime.now(UTC)),
    )


async def records(sessions: async_sessionmaker[AsyncSession]) -> list[EmailRecord]:
    async with sessions() as session:
        query = select(EmailRecord).order_by(col(EmailRecord.created_at))
        return list((await session.exec(query)).all())


async def every_stored_value(engine: AsyncEngine) -> str:
    """Every text and binary value of every table, as one text to search."""
    found: list[str] = []
    async with engine.connect() as conn:
        tables = await conn.run_sync(
            lambda c: {
                t: [col["name"] for col in inspect(c).get_columns(t)]
                for t in inspect(c).get_table_names()
                if t != "alembic_version"
            }
        )
        for table, columns in tables.items():
            rows = (await conn.execute(text(f'SELECT * FROM "{table}"'))).all()  # noqa: S608
            for row in rows:
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        found.append(bytes(value).decode(errors="replace"))
                    elif value is not None:
                        found.append(str(value))
            assert columns  # every table was read
    return "\n".join(found)


# -- the welcome window ------------------------------------------------------------------------


async def test_an_address_gets_one_welcome_per_window_whoever_signs_up_with_it(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    service = Service(sessions, window=timedelta(hours=24))
    await service.handle(user_created(ERASED, email=FIRST))
    await service.handle(user_created(KEPT, email=FIRST.upper()))  # the same mailbox
    await service.handle(user_created("usr_other123456789", email=SECOND))

    assert service.sent_to() == [FIRST, SECOND]
    statuses = {(r.user_id, r.status) for r in await records(sessions)}
    assert statuses == {(ERASED, "sent"), (KEPT, "suppressed"), ("usr_other123456789", "sent")}
    async with sessions() as session:
        kept = (await session.exec(select(WelcomeSend))).all()
        assert {w.address_hash for w in kept} == {
            address_hash(FIRST, KEY),
            address_hash(SECOND, KEY),
        }
        # the window is over: the address may be welcomed again
        await session.exec(
            update(WelcomeSend).values(last_sent_at=datetime.now(UTC) - timedelta(days=2))
        )
        await session.commit()
    await service.handle(user_created("usr_late0123456789", email=FIRST))
    assert service.sent_to() == [FIRST, SECOND, FIRST]
    # a suppressed welcome is settled: the same user announced again is not reconsidered
    await service.handle(user_created(KEPT, email=FIRST))
    assert len(service.mailer.sent) == 3


async def test_the_window_keeps_keyed_hashes_only_and_zero_turns_it_off(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    service = Service(sessions, window=timedelta(0))
    for n in range(3):
        await service.handle(user_created(f"usr_nolimit{n:08d}", email=FIRST))
    assert service.sent_to() == [FIRST] * 3
    assert address_hash(FIRST, KEY) != address_hash(FIRST, b"another key")
    assert address_hash(FIRST, KEY) == address_hash(f"  {FIRST.lower()} ", KEY)
    windowed = Service(sessions, window=timedelta(hours=1))
    await windowed.handle(user_created("usr_windowed000001", email="w.x@example.net"))
    async with sessions() as session:
        assert (await session.exec(select(WelcomeSend.address_hash))).all() == [
            address_hash("w.x@example.net", KEY)
        ]


@given(address=st.emails(), pad=st.sampled_from(["", " ", "\t", "  \n"]))
def test_an_address_hash_is_the_same_for_one_mailbox_and_shows_nothing_of_it(
    address: str, pad: str
) -> None:
    digest = address_hash(address, KEY)
    assert digest == address_hash(pad + address.upper() + pad, KEY)
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    assert address.lower() not in digest


# -- erasure -----------------------------------------------------------------------------------


async def test_erasure_forgets_every_address_of_the_user_and_replays_change_nothing(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    service = Service(sessions, window=timedelta(hours=24))
    await service.handle(user_created(ERASED, email=FIRST))
    await service.handle(changed(ERASED, FIRST, SECOND))
    await service.handle(subscription_activated(ERASED))  # mailed to the new address
    await service.handle(email_send(to=FIRST))  # a command naming the address only
    await service.handle(user_created(KEPT, email="kept.user@example.com"))
    assert service.sent_to() == [FIRST, SECOND, FIRST, "kept.user@example.com"]
    before = await every_stored_value(engine)
    assert FIRST in before
    assert SECOND in before

    erasure = erased(ERASED)
    await service.handle(erasure)
    await service.handle(erasure)  # redelivered or replayed: nothing left to change

    stored = await every_stored_value(engine)
    for gone in (FIRST, FIRST.lower(), SECOND):
        assert gone not in stored
    assert "kept.user@example.com" in stored
    mine = [r for r in await records(sessions) if r.to == ERASED_ADDRESS]
    assert sorted(r.logical_key.split(":")[0] for r in mine) == [
        "send",
        "subscription_activated",
        "welcome",
    ]
    async with sessions() as session:
        assert (await session.exec(select(Recipient.user_id))).all() == [KEPT]
        assert (await session.exec(select(ErasedUser.user_id))).all() == [ERASED]
        assert len((await session.exec(select(WelcomeSend))).all()) == 2  # hashes survive
        bodies = [b.decode() for b in (await session.exec(select(OutboxRow.body))).all()]
    assert len(bodies) == 1  # the kept user's email.sent; the erased user's three are gone
    assert service.sweeps.swept == [(ERASED, FIRST, SECOND), (ERASED,)]


async def test_events_about_an_erased_user_arriving_late_send_and_store_nothing(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    service = Service(sessions, window=timedelta(hours=24))
    await service.handle(erased(ERASED))  # before anything else: events are not ordered
    await service.handle(user_created(ERASED, email=FIRST))
    await service.handle(changed(ERASED, FIRST, SECOND))  # no retry for an unknown recipient
    await service.handle(subscription_activated(ERASED))
    await service.handle(email_send(to=FIRST, user_id=ERASED))

    assert service.mailer.attempts == 0
    stored = await every_stored_value(engine)
    assert FIRST not in stored
    assert SECOND not in stored
    assert await records(sessions) == []
