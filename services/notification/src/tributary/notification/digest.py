"""Mention digests: the mentions of one user within a window become one email.

In-app stays immediate (one notification per mention, streamed at once); webhooks too. Only the
email of ``mentions`` is collected:

* the first mention of a user with no open digest **opens** one (``digests`` row, closing
  ``NOTIFICATION_DIGEST_WINDOW_SECONDS`` later) and schedules its ``digest`` job for then (a
  ``notification.job`` staged in the outbox with ``deliver_at``), in the handler's transaction;
* every mention **adds** an item to the open digest: one per user and source, so a mention
  redelivered or announced again under another event id is listed once, in one digest only;
* the job **closes** the digest and stages **one** ``email.send`` listing its mentions (or holds
  it, if the user is in quiet hours then; or sends nothing, if they switched mentions email off
  meanwhile). Its request id is a UUIDv5 of the digest's source ``digest:{id}``, and a
  ``deliveries`` row is written with it: the relay publishing it twice, or the job running
  twice, still makes one mail (the email service sends once per request id).

Every step takes the user's inbox lock first, so for one user opening, adding and closing happen
one after the other whatever the replicas and consumers: two mentions arriving at once in two
transactions cannot open two digests (the partial unique index ``uq_digests_open`` would refuse
the second anyway), and a mention arriving while a digest is being closed waits, then opens the
next digest. A restart in the window loses nothing: the digest, its items and the scheduled job
are rows in the database. A digest whose job was lost (dead-lettered) is closed when the next
mention finds it overdue.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from sqlmodel import col, select

from tributary.contracts.events import NotificationJobV1
from tributary.messaging.db import now
from tributary.messaging.erasure import was_erased
from tributary.messaging.uow import UnitOfWork
from tributary.notification.channels import Dispatcher, Notice
from tributary.notification.jobs import Jobs
from tributary.notification.metrics import NotificationMetrics, after_commit
from tributary.notification.models import Delivery
from tributary.notification.preferences import Category, ChannelName
from tributary.notification.quiet_models import Digest, DigestItem
from tributary.notification.store import lock_inbox

log = logging.getLogger("tributary.notification")

JOB = "digest"
CATEGORY: Category = "mentions"
CHANNEL: ChannelName = "email"
TEXT_LIMIT = 2000
"""What ``email.send`` takes in one variable: the list stops short of it."""
OVERDUE = timedelta(minutes=5)
"""A digest still open this long after its window ended lost its job (dead-lettered, say): the
next mention schedules it again, at once."""


def new_digest_id() -> str:
    return f"dg_{uuid.uuid4().hex}"


def _more(count: int) -> str:
    return f"... and {count} more: see them in the app."


def compose(digest: Digest, items: Sequence[DigestItem]) -> Notice:
    """The digest's email: a line per mention (its link), as many as fit."""
    count = len(items)
    title = (
        "You were mentioned in a comment"
        if count == 1
        else f"You were mentioned in {count} comments"
    )
    lead = (
        "Someone mentioned you in a comment:"
        if count == 1
        else f"You were mentioned in {count} comments:"
    )
    lines = [lead, ""]
    length = len(lead) + 1
    for n, item in enumerate(items, start=1):
        line = f"{n}. {item.url or 'a comment (open the app to see it)'}"
        after = count - n  # room is kept for the line saying how many did not fit
        kept = len(_more(after)) + 1 if after else 0
        if length + 1 + len(line) + kept > TEXT_LIMIT:
            lines.append(_more(after + 1))
            break
        lines.append(line)
        length += 1 + len(line)
    return Notice(
        user_id=digest.user_id,
        category=CATEGORY,
        title=title,
        body="\n".join(lines),
        source=f"digest:{digest.id}",
        event_id=items[0].event_id if items else digest.id,
    )


class Digests:
    """The dispatcher's :class:`~tributary.notification.channels.Collector` and the digest job."""

    def __init__(self, window_seconds: float, metrics: NotificationMetrics) -> None:
        self.window = timedelta(seconds=window_seconds)
        self.metrics = metrics

    def collects(self, notice: Notice, channel: ChannelName) -> bool:
        return notice.category == CATEGORY and channel == CHANNEL

    async def collect(self, notice: Notice, uow: UnitOfWork) -> None:
        """Add the mention to the user's open digest, opening one if there is none. The
        dispatcher holds the user's inbox lock."""
        session = uow.session
        if await session.get(DigestItem, (notice.user_id, notice.source)) is not None:
            log.info("%s is in a digest already", notice.source)
            return
        if await session.get(Delivery, (notice.user_id, notice.source, CHANNEL)) is not None:
            log.info("%s was mailed on its own before: not in a digest", notice.source)
            return
        digest = (
            await session.exec(
                select(Digest)
                .where(col(Digest.user_id) == notice.user_id)
                .where(col(Digest.closed_at).is_(None))
            )
        ).first()
        if digest is None:
            opened = now()
            digest = Digest(
                id=new_digest_id(),
                user_id=notice.user_id,
                opened_at=opened,
                closes_at=opened + self.window,
            )
            session.add(digest)
            await session.flush()
            Jobs.schedule(uow, JOB, digest.id, at=digest.closes_at, user_id=notice.user_id)
            log.info("digest %s opened until %s", digest.id, digest.closes_at)
        elif digest.closes_at + OVERDUE < now():  # its job is lost: once more (it closes once)
            again = f"{JOB}:{digest.id}:{uuid.uuid4().hex[:12]}"
            Jobs.schedule(uow, JOB, digest.id, at=None, user_id=notice.user_id, key=again)
            log.warning("digest %s is overdue: its job is scheduled again", digest.id)
        session.add(
            DigestItem(
                user_id=notice.user_id,
                source=notice.source,
                digest_id=digest.id,
                url=notice.url,
                event_id=notice.event_id,
            )
        )
        await session.flush()

    def job(
        self, dispatcher: Dispatcher
    ) -> Callable[[NotificationJobV1, UnitOfWork], Awaitable[None]]:
        async def close(job: NotificationJobV1, uow: UnitOfWork) -> None:
            await self.close(job, uow, dispatcher)

        return close

    async def close(self, job: NotificationJobV1, uow: UnitOfWork, dispatcher: Dispatcher) -> None:
        """Close the digest and send its email once (see the module doc)."""
        if uow.suppress_side_effects:
            log.info("replayed digest job %s: nothing sent", job.ref)
            return
        session = uow.session
        user_id = job.user_id
        if user_id is None:
            found = await session.get(Digest, job.ref)
            if found is None:
                return
            user_id = found.user_id
        if await was_erased(session, user_id):
            return
        await lock_inbox(session, user_id)  # adds of the user wait until this commits
        digest = (
            await session.exec(
                select(Digest)
                .where(col(Digest.id) == job.ref)
                .execution_options(populate_existing=True)
            )
        ).first()
        if digest is None or digest.closed_at is not None:
            log.info("digest %s is closed already: nothing sent again", job.ref)
            return
        items = list(
            (
                await session.exec(
                    select(DigestItem)
                    .where(col(DigestItem.digest_id) == digest.id)
                    .order_by(col(DigestItem.created_at), col(DigestItem.source))
                )
            ).all()
        )
        digest.closed_at = now()
        digest.mentions = len(items)
        session.add(digest)
        await session.flush()
        if not items:
            after_commit(session, self.metrics.digests.labels("empty").inc)
            return
        sent = await dispatcher.send(compose(digest, items), CHANNEL, uow)
        log.info("digest %s of %d mention(s) closed (sent: %s)", digest.id, len(items), sent)
        if sent:
            after_commit(session, self.metrics.digests.labels("sent").inc)
            after_commit(session, lambda: self.metrics.digest_mentions.observe(len(items)))
        else:
            after_commit(session, self.metrics.digests.labels("switched_off").inc)
