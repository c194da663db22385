"""Mention digests on SQLite and PostgreSQL: one email per window however the mentions arrive --
redelivered, at once in separate transactions, on several consumers, across a restart -- and
none dropped, even while a digest is being closed."""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.envelope import CloudEvent
from tributary.messaging.db import OutboxRow, now
from tributary.notification.channels import _REQUEST_IDS
from tributary.notification.digest import TEXT_LIMIT, compose
from tributary.notification.quiet_models import Digest, DigestItem
from tributary.notification.store import set_choice
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .deferred import Deferred, Restartable, job, restartable
from .events import comment_mentioned, new_user, report_ready, user_created, user_erased
from .test_quiet_hours import quiet_until

WINDOW = 1.5


def mentions(user: str, count: int) -> list[CloudEvent[Any]]:
    return [
        comment_mentioned(user, url=f"https://comments.example.com/d/{n}#c{n}")
        for n in range(1, count + 1)
    ]


def listed(email: dict[str, Any]) -> list[str]:
    """The links a digest email lists, in order."""
    return re.findall(r"^\d+\. (\S+)$", email["variables"]["text"], flags=re.MULTILINE)


def urls(count: int) -> list[str]:
    return [f"https://comments.example.com/d/{n}#c{n}" for n in range(1, count + 1)]


# -- handler by handler -------------------------------------------------------------------------


@pytest.fixture
def deferred(sessions: async_sessionmaker[AsyncSession]) -> Deferred:
    return Deferred(sessions)


async def known_user(deferred: Deferred) -> str:
    user = new_user()
    await deferred.handle(user_created(user))
    return user


async def close_all(deferred: Deferred, user: str) -> None:
    for digest_job, _ in await deferred.scheduled("digest"):
        if digest_job.user_id == user:
            await deferred.run(digest_job)


async def test_mentions_in_a_window_are_one_email_in_app_stays_immediate(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    events = mentions(user, 20)
    for event in events:
        await deferred.handle(event)
    for event in events[::3]:  # redelivered, and announced again under another event id
        await deferred.handle(event)
        await deferred.handle(event.model_copy(update={"id": f"{event.id}-again"}))

    assert len(await deferred.inbox(user)) == 20
    assert await deferred.emails(user) == []  # the window is open
    assert [n.category for n in deferred.other.delivered] == ["mentions"] * 20  # webhooks: at once
    [(digest_job, due)] = await deferred.scheduled("digest")
    [(digest, items)] = await deferred.digests_of(user)
    assert digest_job.ref == digest.id
    assert due == digest.closes_at
    assert digest.closes_at - digest.opened_at == timedelta(seconds=600)
    assert len(items) == 20

    await deferred.run(digest_job)
    await deferred.run(digest_job)  # a second run sends nothing new
    await deferred.run(digest_job, replay=True)
    [email] = await deferred.emails(user)
    assert email["subject"] == "You were mentioned in 20 comments"
    assert listed(email) == urls(20)
    assert email["list_unsubscribe_url"].startswith("https://notify.example.com/unsubscribe")
    [(digest, _)] = await deferred.digests_of(user)
    assert digest.closed_at is not None
    assert digest.mentions == 20
    assert deferred.metrics.digests.labels("sent")._value.get() == 1
    assert deferred.metrics.digest_mentions._sum.get() == 20

    for event in events[:2]:  # redelivered after the close: in no digest again
        await deferred.handle(event)
    assert len(await deferred.digests_of(user)) == 1
    fresh = comment_mentioned(user, url="https://comments.example.com/d/21#c21")
    await deferred.handle(fresh)  # the next mention opens the next digest
    await close_all(deferred, user)
    emails = await deferred.emails(user)
    assert [e["subject"] for e in emails] == [
        "You were mentioned in 20 comments",
        "You were mentioned in a comment",
    ]
    assert listed(emails[1]) == ["https://comments.example.com/d/21#c21"]


async def test_the_request_id_comes_from_the_digest_and_one_email_per_digest(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    for event in mentions(user, 2):
        await deferred.handle(event)
    await close_all(deferred, user)
    [(digest, _)] = await deferred.digests_of(user)
    [email] = await deferred.emails(user)
    again = compose(digest, [])
    assert again.source == f"digest:{digest.id}"
    # the same digest always gives the same request id (the email service sends once per id)
    expected = uuid.uuid5(_REQUEST_IDS, f"digest:{digest.id}|{user}|email")
    assert email["request_id"] == str(expected)


async def test_concurrent_mentions_in_separate_transactions_open_one_digest(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    events = mentions(user, 12)
    twins = [e.model_copy(update={"id": f"{e.id}-twin"}) for e in events]
    await asyncio.gather(
        *(deferred.handle(e) for pair in zip(events, twins, strict=True) for e in pair)
    )
    [(_, items)] = await deferred.digests_of(user)
    assert sorted(i.url or "" for i in items) == sorted(urls(12))
    assert len(await deferred.scheduled("digest")) == 1
    await close_all(deferred, user)
    [email] = await deferred.emails(user)
    assert sorted(listed(email)) == sorted(urls(12))


async def test_a_mention_arriving_while_the_digest_closes_goes_into_one_digest_or_the_next(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    seen: list[str] = []
    for round_ in range(4):
        first = comment_mentioned(user, url=f"https://comments.example.com/r{round_}/a")
        await deferred.handle(first)
        [(digest, _)] = [d for d in await deferred.digests_of(user) if d[0].closed_at is None]
        racing = comment_mentioned(user, url=f"https://comments.example.com/r{round_}/b")
        await asyncio.gather(deferred.run(job("digest", digest.id, user)), deferred.handle(racing))
        seen += [
            f"https://comments.example.com/r{round_}/a",
            f"https://comments.example.com/r{round_}/b",
        ]
    await close_all(deferred, user)
    listed_all = [url for email in await deferred.emails(user) for url in listed(email)]
    assert sorted(listed_all) == sorted(seen)  # every mention once, none dropped
    assert all(d.closed_at is not None for d, _ in await deferred.digests_of(user))


async def test_a_digest_whose_job_was_lost_is_closed_by_the_next_mention(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    first, second = mentions(user, 2)
    await deferred.handle(first)
    [(digest, _)] = await deferred.digests_of(user)
    async with deferred.sessions() as session:  # its job was dead-lettered long ago
        stored = await session.get(Digest, digest.id)
        assert stored is not None
        stored.closes_at = now() - timedelta(hours=1)
        session.add(stored)
        await session.commit()
    await deferred.handle(second)
    jobs = await deferred.scheduled("digest")
    assert [j.ref for j, _ in jobs] == [digest.id, digest.id]
    assert jobs[1][1] <= datetime.now(UTC)  # at once
    await deferred.run(jobs[1][0])
    await deferred.run(jobs[0][0])
    [email] = await deferred.emails(user)
    assert listed(email) == urls(2)


async def test_at_most_one_open_digest_per_user_in_the_database_itself(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    async with deferred.sessions() as session:
        for n in range(2):
            session.add(Digest(id=f"dg_{n}x{user}", user_id=user, closes_at=now()))
        with pytest.raises(IntegrityError):
            await session.commit()
    async with deferred.sessions() as session:  # closed ones may be many
        for n in range(2):
            session.add(Digest(id=f"dg_{n}y{user}", user_id=user, closes_at=now(), closed_at=now()))
        session.add(Digest(id=f"dg_open{user}", user_id=user, closes_at=now()))
        await session.commit()


async def test_quiet_hours_hold_the_digest_email_and_switching_off_sends_nothing(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    end = await quiet_until(deferred, user, 600)
    for event in mentions(user, 3):
        await deferred.handle(event)
    await close_all(deferred, user)
    assert await deferred.emails(user) == []
    [held] = [h for h in await deferred.held(user) if h.channel == "email"]
    assert held.release_at == end
    assert held.source.startswith("digest:")
    [(deliver, _)] = await deferred.scheduled("deliver")
    await deferred.run(deliver)
    [email] = await deferred.emails(user)
    assert listed(email) == urls(3)

    other = await known_user(deferred)
    for event in mentions(other, 2):
        await deferred.handle(event)
    async with deferred.sessions() as session:
        await set_choice(session, other, "mentions", "email", False)
        await session.commit()
    await close_all(deferred, other)
    assert await deferred.emails(other) == []
    assert deferred.metrics.digests.labels("switched_off")._value.get() == 1


async def test_erasure_deletes_digests_and_held_rows(deferred: Deferred) -> None:
    user = await known_user(deferred)
    await quiet_until(deferred, user, 600)
    for event in mentions(user, 2):
        await deferred.handle(event)
    await deferred.handle(report_ready(user))
    assert await deferred.held(user) != []
    await deferred.handle(user_erased(user))
    assert await deferred.digests_of(user) == []
    assert await deferred.held(user) == []
    await close_all(deferred, user)  # the jobs were purged; run anyway, they find nothing
    assert await deferred.emails(user) == []


def test_a_long_digest_lists_what_fits_and_says_how_many_more() -> None:
    digest = Digest(id="dg_1", user_id="usr_abcdefgh", closes_at=datetime.now(UTC))
    items = [
        DigestItem(
            user_id="usr_abcdefgh",
            source=f"comment.mentioned:c{n}",
            digest_id="dg_1",
            url=f"https://comments.example.com/{'x' * 150}/{n}",
            event_id=f"e{n}",
        )
        for n in range(40)
    ] + [DigestItem(user_id="usr_abcdefgh", source="s", digest_id="dg_1", event_id="e")]
    notice = compose(digest, items)
    assert len(notice.body) <= TEXT_LIMIT
    lines = notice.body.splitlines()
    shown = [line for line in lines if re.match(r"^\d+\. ", line)]
    assert lines[-1] == f"... and {41 - len(shown)} more: see them in the app."
    assert notice.title == "You were mentioned in 41 comments"
    assert "a comment (open the app to see it)" in compose(digest, items[-1:]).body


# -- through the app, on the broker --------------------------------------------------------------


@pytest.fixture
async def app(database_url: str, rabbitmq: Found) -> AsyncIterator[Restartable]:
    async with restartable(
        database_url, rabbitmq.url, NOTIFICATION_DIGEST_WINDOW_SECONDS=WINDOW
    ) as runner:
        yield runner


async def staged(runner: Restartable) -> int:
    async with runner.service.app.state.sessions() as session:
        query = select(func.count()).where(col(OutboxRow.routing_key) == "email.send.v1")
        return int((await session.exec(query)).one())


async def closed(runner: Restartable, count: int = 1) -> None:
    """Wait until ``count`` digests are closed."""

    async def done() -> bool:
        async with runner.service.app.state.sessions() as session:
            query = select(func.count()).where(col(Digest.closed_at).is_not(None))
            return int((await session.exec(query)).one()) >= count

    await eventually(done, timeout=20, what=f"{count} digest(s) closed")


async def mailed_once_each(runner: Restartable, user: str, expected: list[str]) -> int:
    """Close every digest of ``user`` and check each mention is listed in exactly one digest mail
    and no two digests were open at once; the number of digests.

    A busy machine can take longer than the window to deliver the mentions: then the window
    closes and the late ones open the next digest -- the right behaviour, so it is allowed here.
    """

    async def digests() -> list[Digest]:
        async with runner.service.app.state.sessions() as session:
            query = select(Digest).where(col(Digest.user_id) == user)
            return list((await session.exec(query.order_by(col(Digest.opened_at)))).all())

    await eventually(
        lambda: _all_closed(digests), timeout=20, what="every digest of the user closed"
    )
    found = await digests()
    for earlier, later in itertools.pairwise(found):
        assert earlier.closed_at is not None
        assert later.opened_at >= earlier.closed_at
    emails = await runner.service.commands(expect=len(found))
    links = [link for email in emails for link in listed(email)]
    assert sorted(links) == sorted(expected), "a mention is missing or listed twice"
    assert await staged(runner) == len(found)
    return len(found)


async def _all_closed(digests: Any) -> bool:
    found = await digests()
    return bool(found) and all(d.closed_at is not None for d in found)


async def in_app(runner: Restartable, user: str) -> int:
    answer = await runner.service.client.get(f"/users/{user}/notifications", params={"limit": 100})
    return len(answer.json()["items"])


async def test_twenty_mentions_redelivered_are_each_listed_once_in_the_digest_mails(
    app: Restartable,
) -> None:
    service = app.service
    user = new_user()
    await service.deliver(user_created(user))
    events = mentions(user, 20)
    for event in events:
        await service.publish(event, times=2)  # every one redelivered
    await service.publish(events[0].model_copy(update={"id": "again-under-another-id"}))
    for event in events:
        await service.handled(event, times=2)
    assert await in_app(app, user) == 20

    digests = await mailed_once_each(app, user, urls(20))  # one, unless the window passed
    metrics = (await service.client.get("/metrics")).text
    assert f'tributary_notification_digests_total{{outcome="sent"}} {digests}.0' in metrics
    assert "tributary_notification_digest_mentions_sum 20.0" in metrics


async def test_several_consumers_at_once_make_one_digest(
    database_url: str, rabbitmq: Found
) -> None:
    async with restartable(
        database_url,
        rabbitmq.url,
        messaging={"concurrency": 4, "batch_max": 1},
        NOTIFICATION_DIGEST_WINDOW_SECONDS=WINDOW,
    ) as runner:
        service = runner.service
        user = new_user()
        await service.deliver(user_created(user))
        await service.deliver(*mentions(user, 16))
        assert await in_app(runner, user) == 16
        await mailed_once_each(runner, user, urls(16))


async def test_a_restart_in_the_window_makes_one_digest_with_every_mention(
    database_url: str, rabbitmq: Found
) -> None:
    async with restartable(
        database_url, rabbitmq.url, NOTIFICATION_DIGEST_WINDOW_SECONDS=8.0
    ) as runner:
        service = runner.service
        user = new_user()
        await service.deliver(user_created(user))
        events = mentions(user, 20)
        await service.deliver(*events[:10])
        await runner.restart()  # in the window
        service = runner.service
        await service.deliver(*events[10:])
        async with service.app.state.sessions() as session:
            digests = (await session.exec(select(Digest))).all()
        assert len(digests) == 1
        assert digests[0].closed_at is None, "the restart took longer than the window"

        await closed(runner)
        [email] = await service.commands(expect=1)
        assert listed(email) == urls(20)
        assert await staged(runner) == 1
        assert await in_app(runner, user) == 20
