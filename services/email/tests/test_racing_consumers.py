"""Claims: the logical email is claimed in a transaction of its own, committed before SMTP.

Each delivery runs as the runtime runs it (its own transaction, committed after the handler),
on databases made by the service's migrations, SQLite and PostgreSQL alike, against a real
SMTP server where it matters.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from email.message import EmailMessage
from typing import Any, cast

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.envelope import CloudEvent
from tributary.email.handlers import (
    Claim,
    ClaimHeld,
    Delivery,
    Gate,
    Outgoing,
    Passed,
    claim,
    on_email_send,
    on_user_created,
    on_user_erased,
    welcome_window_open,
)
from tributary.email.mailer import Mailer, SmtpError
from tributary.email.models import ERASED_ADDRESS, EmailRecord, WelcomeSend, message_id_for
from tributary.messaging.db import create_engine, session_factory
from tributary.messaging.testing import SweepRecorder
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.waiting import eventually

from .smtp_server import Mailbox, smtp_server
from .test_erasure import erased
from .test_handlers import email_send, user_created

FROM = "no-reply@tributary.dev"
Handler = Callable[[CloudEvent[Any], UnitOfWork, Delivery], Awaitable[None]]


class GatedMailer:
    """Holds every send until ``release`` is set, so a second consumer can race the first."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.sent: list[EmailMessage] = []
        self.attempts = 0

    async def send(self, message: EmailMessage) -> None:
        self.attempts += 1
        self.started.set()
        await self.release.wait()
        self.sent.append(message)


async def wait_for_a_lock_wait(engine: AsyncEngine, timeout: float = 20.0) -> None:
    """Until a PostgreSQL session of ``engine``'s database waits on a lock."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )

    async def waiting_on_a_lock() -> bool:
        async with engine.connect() as conn:
            return bool((await conn.execute(query)).scalar_one())

    await eventually(
        waiting_on_a_lock, timeout=timeout, what="a session waiting on a lock", poll=0.02
    )


async def handle(
    sessions: async_sessionmaker[AsyncSession],
    handler: Handler,
    event: CloudEvent[Any],
    delivery: Delivery,
) -> None:
    """One delivery as the runtime handles it: one transaction, committed after the handler."""
    async with UnitOfWork(sessions(), "/services/email", sweeper=SweepRecorder()) as uow:
        await handler(event, uow, delivery)
        await uow.commit()


async def until_handled(
    sessions: async_sessionmaker[AsyncSession],
    handler: Handler,
    event: CloudEvent[Any],
    delivery: Delivery,
) -> None:
    """Handle ``event``, retrying transient failures as the runtime's retries would."""
    for _ in range(200):
        try:
            await handle(sessions, handler, event, delivery)
            return
        except (ClaimHeld, SmtpError):
            await asyncio.sleep(0.02)
    raise AssertionError(f"{event.id} never handled")


async def records(sessions: async_sessionmaker[AsyncSession]) -> list[EmailRecord]:
    async with sessions() as session:
        return list((await session.exec(select(EmailRecord))).all())


async def test_a_fresh_claim_held_by_another_consumer_is_retried_not_sent(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    mailer = GatedMailer()
    delivery = Delivery(mailer=mailer, from_address=FROM)
    # the same user announced twice under two event ids: the inbox cannot tell them apart
    sending = asyncio.create_task(handle(sessions, on_user_created, user_created(), delivery))
    await mailer.started.wait()  # the first consumer's claim is committed, SMTP under way
    [claimed] = await records(sessions)
    assert (claimed.status, claimed.claimed_by is not None) == ("sending", True)

    with pytest.raises(ClaimHeld):  # the second does not wait on a lock: it is retried later
        await handle(sessions, on_user_created, user_created(), delivery)
    assert mailer.attempts == 1

    mailer.release.set()
    await sending
    await handle(sessions, on_user_created, user_created(), delivery)  # the retry: sent

    assert len(mailer.sent) == mailer.attempts == 1
    [record] = await records(sessions)
    assert (record.status, record.claimed_at, record.claimed_by) == ("sent", None, None)


async def test_concurrent_deliveries_never_send_a_logical_email_twice(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    mailbox = Mailbox()
    workers = asyncio.Semaphore(8)  # the runtime's worker tasks
    claims = create_engine(engine.url.render_as_string(hide_password=False))
    async with smtp_server(mailbox) as port:
        mailer = Mailer("127.0.0.1", port, timeout=5, connections=4)
        delivery = Delivery(mailer=mailer, from_address=FROM)
        delivery.claims.bind(session_factory(claims))  # as the app does

        async def worker(command: CloudEvent[Any]) -> None:
            async with workers:
                await until_handled(sessions, on_email_send, command, delivery)

        commands = [email_send(to=f"reader{n}@example.com") for n in range(12)]
        # every command delivered four times at once (redeliveries, consumers racing)
        await asyncio.gather(*(worker(command) for command in commands * 4))
        await mailer.close()
    await claims.dispose()

    ids = Counter(str(m["Message-ID"]) for m in mailbox.messages)
    assert sorted(ids) == sorted(message_id_for(f"send:{c.data.request_id}") for c in commands)
    assert set(ids.values()) == {1}
    assert {r.status for r in await records(sessions)} == {"sent"}
    assert mailbox.connections <= 4


async def test_accepted_but_not_marked_sent_is_resent_after_the_lease_with_the_same_message_id(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    mailbox = Mailbox()
    lease = timedelta(seconds=1)
    async with smtp_server(mailbox) as port:
        mailer = Mailer("127.0.0.1", port, timeout=5)
        dying = Delivery(mailer=mailer, from_address=FROM, claim_lease=lease)
        event = user_created()
        async with UnitOfWork(sessions(), "/services/email") as uow:
            await on_user_created(event, uow, dying)
            # the process dies here: the SMTP server has the mail, the transaction never commits
        assert len(mailbox.messages) == 1
        [claimed] = await records(sessions)
        assert claimed.status == "sending"

        restarted = Delivery(mailer=mailer, from_address=FROM, claim_lease=lease)
        with pytest.raises(ClaimHeld):  # redelivered at once: the claim may still be alive
            await handle(sessions, on_user_created, event, restarted)
        assert len(mailbox.messages) == 1

        async def handled_after_the_lease() -> bool:
            try:
                await handle(sessions, on_user_created, event, restarted)
            except ClaimHeld:
                return False
            return True

        await eventually(handled_after_the_lease, what="the stale claim taken over", timeout=10)
        await handle(sessions, on_user_created, event, restarted)  # and never again
        await mailer.close()

    first, again = mailbox.messages
    assert (
        first["Message-ID"]
        == again["Message-ID"]
        == message_id_for(f"welcome:{event.data.user_id}")
    )
    [record] = await records(sessions)
    assert record.status == "sent"


async def test_a_failed_commit_retried_in_the_same_process_settles_without_resending(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        mailer = Mailer("127.0.0.1", port, timeout=5)
        delivery = Delivery(mailer=mailer, from_address=FROM)
        command = email_send()
        async with UnitOfWork(sessions(), "/services/email") as uow:
            await on_email_send(command, uow, delivery)
            # the commit fails (the database went away for a moment): rolled back
        await handle(sessions, on_email_send, command, delivery)  # the runtime's retry
        await mailer.close()

    assert len(mailbox.messages) == 1
    [record] = await records(sessions)
    assert record.status == "sent"


async def test_a_claim_left_by_a_crash_before_smtp_is_sent_once_after_the_lease(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    mailer = GatedMailer()
    lease = timedelta(seconds=1)
    delivery = Delivery(mailer=mailer, from_address=FROM, claim_lease=lease)
    event = user_created()
    dying = asyncio.create_task(handle(sessions, on_user_created, event, delivery))
    await mailer.started.wait()
    dying.cancel()  # SIGKILL before the SMTP server saw a byte
    with pytest.raises(asyncio.CancelledError):
        await dying
    mailer.release.set()

    await until_handled(sessions, on_user_created, event, delivery)

    assert len(mailer.sent) == 1
    assert [r.status for r in await records(sessions)] == ["sent"]


async def test_an_erased_users_claim_left_by_a_crash_is_anonymised_and_never_sent(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    mailer = GatedMailer()
    delivery = Delivery(mailer=mailer, from_address=FROM, claim_lease=timedelta(seconds=1))
    command = email_send(to="gone.person@example.com")
    dying = asyncio.create_task(handle(sessions, on_email_send, command, delivery))
    await mailer.started.wait()
    dying.cancel()  # the claim stays behind
    with pytest.raises(asyncio.CancelledError):
        await dying
    mailer.release.set()
    user_id = "usr_gone0123456789"
    async with sessions() as session:  # the email was for a user the erasure knows
        [claimed] = (await session.exec(select(EmailRecord))).all()
        claimed.user_id = user_id
        session.add(claimed)
        await session.commit()

    await handle(sessions, lambda e, u, _d: on_user_erased(e, u), erased(user_id), delivery)
    [record] = await records(sessions)
    assert (record.status, record.to) == ("sending", ERASED_ADDRESS)

    await until_handled(sessions, on_email_send, command, delivery)

    assert mailer.sent == []
    [record] = await records(sessions)
    assert (record.status, record.to) == ("suppressed", ERASED_ADDRESS)
    async with sessions() as session:
        rows = await session.exec(
            select(EmailRecord.to).where(col(EmailRecord.to) != ERASED_ADDRESS)
        )
        assert rows.all() == []


def outgoing(key: str, to: str) -> Outgoing:
    return Outgoing(
        logical_key=key, to=to, template="welcome", subject="Hi", body="Hello", locale="en-GB"
    )


class HeldOpen:
    """Wraps a gate: the claim's transaction (its row inserted, not committed) waits inside it
    until ``go_on`` is set, then commits -- or rolls back when ``fail`` is set."""

    def __init__(self, gate: Gate | None = None, *, fail: bool = False) -> None:
        self.gate = gate
        self.fail = fail
        self.inside = asyncio.Event()
        self.go_on = asyncio.Event()

    async def __call__(
        self, mail: Outgoing, session: AsyncSession, delivery: Delivery
    ) -> Passed | None:
        passed = Passed() if self.gate is None else await self.gate(mail, session, delivery)
        self.inside.set()
        await self.go_on.wait()
        if self.fail:
            raise RuntimeError("the first claimer dies before its claim commits")
        return passed


async def race(
    engine: AsyncEngine,
    delivery: Delivery,
    first: tuple[Outgoing, HeldOpen],
    second: tuple[Outgoing, Gate | None],
) -> tuple[asyncio.Task[Claim | None], asyncio.Task[Claim | None]]:
    """The second claim starts while the first's insert is not committed yet (on PostgreSQL:
    until it waits on the first's lock), then the first goes on."""
    held = first[1]
    one = asyncio.create_task(claim(first[0], cast(Any, None), delivery, held))
    await held.inside.wait()
    two = asyncio.create_task(claim(second[0], cast(Any, None), delivery, second[1]))
    if engine.dialect.name == "postgresql":
        await wait_for_a_lock_wait(engine)
    held.go_on.set()
    return one, two


@pytest.mark.parametrize("first_fails", [False, True], ids=["first commits", "first rolls back"])
async def test_a_claimer_meeting_an_uncommitted_claim_of_the_key_gets_its_outcome(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], first_fails: bool
) -> None:
    delivery = Delivery(mailer=GatedMailer(), from_address=FROM)
    delivery.claims.bind(sessions)
    mail = outgoing("send:race-0001", "racer@example.com")

    one, two = await race(engine, delivery, (mail, HeldOpen(fail=first_fails)), (mail, None))

    if not first_fails:  # the key is claimed and fresh: the second is retried later
        mine = await one
        with pytest.raises(ClaimHeld):
            await two
    else:  # nothing was committed: the second claims the key as new
        with pytest.raises(RuntimeError):
            await one
        mine = await two
    assert mine is not None
    assert mine.created
    [record] = await records(sessions)
    assert (record.status, record.claimed_by) == ("sending", mine.token)


@pytest.mark.parametrize("first_fails", [False, True], ids=["first commits", "first rolls back"])
async def test_two_sign_ups_with_one_address_at_once_claim_one_welcome(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], first_fails: bool
) -> None:
    delivery = Delivery(mailer=GatedMailer(), from_address=FROM)
    delivery.claims.bind(sessions)
    first = outgoing("welcome:usr_first0000001", "Same.Person@example.com")
    second = outgoing("welcome:usr_second000001", "same.person@EXAMPLE.com")

    one, two = await race(
        engine,
        delivery,
        (first, HeldOpen(welcome_window_open, fail=first_fails)),
        (second, welcome_window_open),
    )

    if not first_fails:  # the window is taken: the second welcome is suppressed, for good
        assert await one is not None
        assert await two is None
        expected = {first.logical_key: "sending", second.logical_key: "suppressed"}
    else:  # the first took nothing: the second gets the window
        with pytest.raises(RuntimeError):
            await one
        assert await two is not None
        expected = {second.logical_key: "sending"}
    assert {r.logical_key: r.status for r in await records(sessions)} == expected
    async with sessions() as session:
        assert len((await session.exec(select(WelcomeSend))).all()) == 1
