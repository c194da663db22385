"""The handlers on databases made by the service's migrations, SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.envelope import CloudEvent
from tributary.messaging.db import OutboxRow
from tributary.messaging.erasure import ErasedUser
from tributary.notification import tokens
from tributary.notification.channels import RecipientNotYetKnown
from tributary.notification.handlers import safe_link
from tributary.notification.models import Address, Delivery
from tributary.notification.preferences import CATEGORIES, CHANNELS
from tributary.notification.store import set_choice

from .events import (
    comment_mentioned,
    email_changed,
    new_user,
    report_ready,
    subscription_activated,
    user_created,
    user_erased,
    workspace_created,
)
from .harness import KEY, Service
from .service import PUBLIC_URL


@pytest.fixture
def service(sessions: async_sessionmaker[AsyncSession]) -> Service:
    return Service(sessions)


async def known_user(service: Service, email: str = "ada@example.com") -> str:
    user = new_user()
    await service.handle(user_created(user, email, locale="de-DE"))
    return user


async def test_each_event_type_notifies_its_recipient_in_app_and_by_email(
    service: Service,
) -> None:
    user = await known_user(service)
    author = await known_user(service, "grace@example.com")
    events: list[CloudEvent[Any]] = [
        workspace_created(user, "Ada's workspace"),
        subscription_activated(user),
        comment_mentioned(user, author=author),
        report_ready(user, "Q3 revenue"),
    ]
    for event in events:
        await service.handle(event)

    inbox = await service.inbox(user)
    assert [(n.seq, n.category) for n in inbox] == [
        (1, "account"),
        (2, "billing"),
        (3, "mentions"),
        (4, "reports"),
    ]
    assert [n.event_id for n in inbox] == [e.id for e in events]
    assert inbox[0].title == "Your workspace is ready"
    assert "“Ada's workspace”" in inbox[0].body
    assert inbox[0].urgent
    assert not any(n.urgent for n in inbox[1:])
    assert "pro" in inbox[1].title
    assert inbox[2].url == "https://comments.example.com/d/1#c1"
    assert "totals" not in inbox[2].body  # someone else's words stay with the comments product
    assert "“Q3 revenue”" in inbox[3].body
    assert await service.inbox(author) == []

    commands = await service.commands(user)
    mailed = [n for n in inbox if n.category != "billing"]  # billing email is off by default
    assert [c["subject"] for c in commands] == [n.title for n in mailed]
    for command, notification in zip(commands, mailed, strict=True):
        assert command["to"] == "ada@example.com"
        assert command["template"] == "notification"
        assert command["locale"] == "de-DE"
        assert command["variables"] == {"text": notification.body, "url": notification.url or ""}
    # every mail offers one-click unsubscribe, account's too (only its in-app is critical)
    for command, category in zip(commands, ("account", "mentions", "reports"), strict=True):
        url = command["list_unsubscribe_url"]
        assert url.startswith(f"{PUBLIC_URL}/unsubscribe?token=")
        allowed = tokens.parse(url.split("token=", 1)[1], key=KEY)
        assert (allowed.user_id, allowed.category) == (user, category)


async def test_a_redelivered_or_reannounced_event_makes_one_notification_and_one_email(
    service: Service, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await known_user(service)
    first = comment_mentioned(user, comment_id="cmt_samecomment01")
    again = comment_mentioned(user, comment_id="cmt_samecomment01")  # another event id
    for event in (first, first, again, first, again):
        await service.handle(event)

    [notification] = await service.inbox(user)
    assert notification.event_id == first.id
    assert len(await service.commands(user)) == 1
    async with sessions() as session:
        deliveries = (await session.exec(select(Delivery))).all()
    assert [(d.user_id, d.channel) for d in deliveries] == [(user, "email")]


async def test_critical_account_in_app_reaches_a_user_who_switched_everything_off(
    service: Service, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await known_user(service)
    async with sessions() as session:
        for category in CATEGORIES:
            for channel in CHANNELS:
                await set_choice(session, user, category, channel, False)
        await session.commit()

    await service.handle(workspace_created(user))
    await service.handle(report_ready(user))
    await service.handle(subscription_activated(user))

    assert [n.category for n in await service.inbox(user)] == ["account"]
    assert await service.commands(user) == []  # account email follows the user's choice

    async with sessions() as session:
        await set_choice(session, user, "billing", "email", True)  # off by default: on now
        await session.commit()
    await service.handle(subscription_activated(user))
    assert [c["subject"] for c in await service.commands(user)] == ["Your pro plan is active"]


async def test_a_channel_switched_off_is_not_used_including_on_redelivery(
    service: Service, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await known_user(service)
    async with sessions() as session:
        await set_choice(session, user, "mentions", "email", False)
        await set_choice(session, user, "reports", "in_app", False)
        await session.commit()
    mention, report = comment_mentioned(user), report_ready(user)
    for event in (mention, report, mention, report):
        await service.handle(event)

    assert [n.category for n in await service.inbox(user)] == ["mentions"]
    assert [c["subject"] for c in await service.commands(user)] == ["Your report is ready"]


async def test_a_replay_never_stages_email_but_a_forced_one_does(service: Service) -> None:
    user = await known_user(service)
    replayed = report_ready(user)
    await service.handle(replayed, replay=True)
    assert len(await service.inbox(user)) == 1  # in-app is idempotent: made on a replay too
    assert await service.commands(user) == []

    await service.handle(replayed, replay=True)
    await service.handle(replayed, replay=True, forced=True)
    await service.handle(replayed, replay=True, forced=True)
    assert len(await service.inbox(user)) == 1
    assert len(await service.commands(user)) == 1


async def test_email_waits_for_the_users_address_but_in_app_only_needs_the_id(
    service: Service, sessions: async_sessionmaker[AsyncSession]
) -> None:
    stranger = new_user()
    event = report_ready(stranger)
    with pytest.raises(RecipientNotYetKnown):
        await service.handle(event)
    assert await service.inbox(stranger) == []  # rolled back with the failed attempt

    async with sessions() as session:
        await set_choice(session, stranger, "reports", "email", False)
        await session.commit()
    await service.handle(event)
    assert len(await service.inbox(stranger)) == 1


async def test_a_mention_of_oneself_and_unsafe_links_are_left_out(service: Service) -> None:
    user = await known_user(service)
    await service.handle(comment_mentioned(user, author=user))
    await service.handle(comment_mentioned(user, url="javascript:alert(1)"))
    [notification] = await service.inbox(user)
    assert notification.url is None
    assert [c["variables"]["url"] for c in await service.commands(user)] == [""]
    assert safe_link("https://x.example/a?b=c") == "https://x.example/a?b=c"
    for unsafe in ("javascript:alert(1)", "data:text/html,x", "https:///nohost", "//x.example"):
        assert safe_link(unsafe) is None


async def test_the_recipient_directory_follows_versions_and_address_changes_in_any_order(
    service: Service, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = new_user()
    with pytest.raises(RecipientNotYetKnown):  # a change before the user is known: retried
        await service.handle(email_changed(user, "early@example.com"))
    await service.handle(user_created(user, "v1@example.com", locale="fr-FR", version=1))
    later, earlier = datetime.now(UTC), datetime.now(UTC) - timedelta(hours=1)
    await service.handle(email_changed(user, "new@example.com", at=later))
    await service.handle(email_changed(user, "old@example.com", at=earlier))  # late, older
    await service.handle(user_created(user, "v2@example.com", version=2))  # announced again

    async with sessions() as session:
        recipient = await session.get(Address, user)
    assert recipient is not None
    assert (recipient.email, recipient.locale) == ("new@example.com", "fr-FR")
    await service.handle(report_ready(user))
    assert [c["to"] for c in await service.commands(user)] == ["new@example.com"]


async def every_stored_value(engine: AsyncEngine) -> str:
    """Every text and binary value of every table, as one text to search."""
    found: list[str] = []
    async with engine.connect() as conn:
        tables = await conn.run_sync(
            lambda c: [t for t in inspect(c).get_table_names() if t != "alembic_version"]
        )
        for table in tables:
            for row in (await conn.execute(text(f'SELECT * FROM "{table}"'))).all():  # noqa: S608
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        found.append(bytes(value).decode(errors="replace"))
                    elif value is not None:
                        found.append(str(value))
    return "\n".join(found)


async def test_user_erased_removes_everything_about_the_user_and_later_events_store_nothing(
    service: Service, sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    user = await known_user(service, "zelda.quill@example.com")
    kept = await known_user(service, "kept.user@example.com")
    async with sessions() as session:
        await set_choice(session, user, "billing", "email", False)
        await session.commit()
    for event in (
        workspace_created(user, "Zelda's workspace"),
        report_ready(user),
        report_ready(kept),
    ):
        await service.handle(event)

    await service.handle(user_erased(user))
    await service.handle(user_erased(user))  # redelivered: finds nothing left
    for late in (user_created(user, "zelda.quill@example.com"), report_ready(user)):
        await service.handle(late)

    stored = await every_stored_value(engine)
    for trace in (user, "zelda.quill@example.com", "Zelda"):
        if trace == user:  # the id alone stays, in the erased-users list
            async with sessions() as session:
                assert await session.get(ErasedUser, user) is not None
                outbox = (await session.exec(select(OutboxRow.body))).all()
            assert not any(user.encode() in body for body in outbox)
            continue
        assert trace not in stored, f"{trace} is still stored"
    assert await service.inbox(user) == []
    assert len(await service.inbox(kept)) == 1
    # the DLQ sweeps: with the address while it was known, then by the id every event names
    assert [m for m in service.sweeps.swept if m[0] == user] == [
        (user, "zelda.quill@example.com"),
        (user,),
    ]
    async with sessions() as session:
        assert await session.get(Address, kept) is not None
        assert (await session.exec(select(Delivery.user_id))).all() == [kept]


async def test_a_committed_notification_wakes_its_users_streams_and_a_failed_one_does_not(
    service: Service,
) -> None:
    user, other = await known_user(service), await known_user(service)
    with service.streams.subscribe(user) as wake, service.streams.subscribe(other) as quiet:
        await service.handle(report_ready(user))
        assert wake.is_set()
        assert not quiet.is_set()
        wake.clear()
        with pytest.raises(RecipientNotYetKnown):  # rolled back: no wake-up
            await service.handle(report_ready(new_user()))
        await service.handle(report_ready(user, "again"))  # redelivery makes nothing new...
        assert wake.is_set()  # ...but a wake-up costs a stream only one query
    assert service.streams.count() == 0


async def test_sequence_numbers_are_per_user_and_count_up(service: Service) -> None:
    first, second = await known_user(service), await known_user(service)
    for _ in range(3):
        await service.handle(report_ready(first))
        await service.handle(report_ready(second))
    assert [n.seq for n in await service.inbox(first)] == [1, 2, 3]
    assert [n.seq for n in await service.inbox(second)] == [1, 2, 3]
    async with service.sessions() as session:
        unread = select(col(Address.user_id))
        assert len((await session.exec(unread)).all()) == 2


async def test_concurrent_deliveries_for_one_user_commit_in_sequence_order_without_duplicates(
    service: Service,
) -> None:
    """Competing consumers (or replicas) handling one user's events at once: the inbox head
    lock serialises them, so numbers are unique, commit in order, and a duplicate racing its
    original finds it instead of failing on the unique key."""
    user = await known_user(service)
    reports = [report_ready(user, f"report {n}") for n in range(6)]
    twins = [r.model_copy(update={"id": f"{r.id}-again"}) for r in reports]
    await asyncio.gather(
        *(service.handle(e) for pair in zip(reports, twins, strict=True) for e in pair)
    )

    inbox = await service.inbox(user)
    assert [n.seq for n in inbox] == [1, 2, 3, 4, 5, 6]
    assert sorted(n.body for n in inbox) == sorted(
        f"Your report “report {n}” is ready to download." for n in range(6)
    )
    assert len(await service.commands(user)) == 6
