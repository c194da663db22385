"""Quiet hours: notifications that are not urgent wait for their end.

A user may set one window (``22:00`` to ``07:00`` in ``Europe/Berlin``; see
:mod:`tributary.notification.quiet_window` for the clock rules). A notice that is not urgent,
arriving while its user is in quiet hours:

* is stored in the in-app inbox and streamed **at once** (silent: nothing rings);
* is **held** for every other channel on for its category (email, webhook, any channel added
  later): a ``held_deliveries`` row per source and channel, and a ``deliver`` job scheduled for
  the end of the quiet hours (a ``notification.job`` command staged in the outbox with
  ``deliver_at``), both committed with the rest of the handling. A restart loses nothing: the
  rows and the scheduled job are in the database.

The deliver job, when due, takes the user's held rows that are due and, for each, asks the
channel again: **preferences are read at delivery time** (a channel switched off meanwhile
sends nothing), and the channel's own unique delivery key (the ``deliveries`` row of email, the
webhook delivery per endpoint) makes a second run send nothing more. If the user's quiet hours
changed meanwhile and the moment is quiet again, the rows are held until the new end; a ``PUT``
that shortens or removes quiet hours brings the held rows' time forward. Urgent notices
(``account``) are never held.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy import delete, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.events import NotificationJobV1
from tributary.messaging.db import as_utc, now
from tributary.messaging.erasure import was_erased
from tributary.messaging.uow import UnitOfWork
from tributary.notification.channels import Dispatcher, Notice
from tributary.notification.jobs import Jobs
from tributary.notification.metrics import NotificationMetrics, after_commit
from tributary.notification.preferences import CATEGORIES, Category, ChannelName, enabled
from tributary.notification.quiet_models import HeldDelivery, QuietHoursRow
from tributary.notification.quiet_window import QuietWindow
from tributary.notification.store import choices_of, lock_inbox

log = logging.getLogger("tributary.notification")

JOB = "deliver"


def window_of(row: QuietHoursRow | None) -> QuietWindow | None:
    """The stored window. A row the API wrote is valid; a zone this host's time-zone database
    lacks (an older one than the replica's that stored it) counts as no quiet hours, with a
    warning, rather than failing every notification of the user."""
    if row is None:
        return None
    try:
        return QuietWindow.parse(row.start, row.end, row.time_zone)
    except ValueError:
        log.warning("quiet hours of %s are not readable here: not applied", row.user_id)
        return None


async def window_for(session: AsyncSession, user_id: str) -> QuietWindow | None:
    return window_of(await session.get(QuietHoursRow, user_id))


def job_ref(user_id: str, at: datetime) -> str:
    """``{user_id}:{milliseconds}`` (rounded up): the job delivers the user's rows held until
    then."""
    return f"{user_id}:{math.ceil(as_utc(at).timestamp() * 1000)}"


def job_time(ref: str) -> datetime | None:
    _, _, millis = ref.rpartition(":")
    if not millis.isdigit():
        return None
    return datetime.fromtimestamp(int(millis) / 1000, UTC)


def _schedule(uow: UnitOfWork, user_id: str, until: datetime, *, at_once: bool = False) -> None:
    """A deliver job for the rows held until ``until``, due then (or at once). Its key is its
    own: a job scheduled again for the same time (another replica) is not taken for a copy of
    one that has run (the job finds nothing left if its rows went with the other)."""
    ref = job_ref(user_id, until)
    Jobs.schedule(
        uow,
        JOB,
        ref,
        at=None if at_once else until,
        user_id=user_id,
        key=f"{JOB}:{ref}:{uuid.uuid4().hex[:12]}",
    )


class QuietHours:
    """The dispatcher's :class:`~tributary.notification.channels.Holder` and the deliver job."""

    def __init__(self, metrics: NotificationMetrics) -> None:
        self.metrics = metrics

    async def quiet_until(self, session: AsyncSession, user_id: str) -> datetime | None:
        window = await window_for(session, user_id)
        return None if window is None else window.until(now())

    async def hold(
        self, notice: Notice, channel: ChannelName, until: datetime, uow: UnitOfWork
    ) -> None:
        session = uow.session
        key = (notice.user_id, notice.source, channel)
        if await session.get(HeldDelivery, key) is not None:
            log.info("%s for %s is held already", notice.source, channel)
            return
        # one job per user and release time (under the inbox lock: no two transactions race)
        scheduled = await session.exec(
            select(HeldDelivery.source)
            .where(col(HeldDelivery.user_id) == notice.user_id)
            .where(col(HeldDelivery.release_at) == until)
            .limit(1)
        )
        if scheduled.first() is None:
            _schedule(uow, notice.user_id, until)
        session.add(
            HeldDelivery(
                user_id=notice.user_id,
                source=notice.source,
                channel=channel,
                category=notice.category,
                title=notice.title,
                body=notice.body,
                url=notice.url,
                event_id=notice.event_id,
                release_at=until,
            )
        )
        await session.flush()
        log.info("%s for %s held by quiet hours until %s", notice.source, channel, until)
        after_commit(session, self.metrics.held.labels(channel).inc)

    def job(
        self, dispatcher: Dispatcher
    ) -> Callable[[NotificationJobV1, UnitOfWork], Awaitable[None]]:
        async def deliver(job: NotificationJobV1, uow: UnitOfWork) -> None:
            await self.release(job, uow, dispatcher)

        return deliver

    async def release(
        self, job: NotificationJobV1, uow: UnitOfWork, dispatcher: Dispatcher
    ) -> None:
        """Deliver the user's held rows due by the job's time (see the module doc)."""
        if uow.suppress_side_effects:
            log.info("replayed deliver job %s: nothing sent", job.ref)
            return
        user_id, due_by = job.user_id, job_time(job.ref)
        if user_id is None or due_by is None:
            log.warning("deliver job %s names no user or time: ignored", job.ref)
            return
        session = uow.session
        if await was_erased(session, user_id):
            return
        await lock_inbox(session, user_id)  # in turn with the user's handlers and PUTs
        due = list(
            (
                await session.exec(
                    select(HeldDelivery)
                    .where(col(HeldDelivery.user_id) == user_id)
                    .where(col(HeldDelivery.release_at) <= due_by)
                    .order_by(col(HeldDelivery.created_at), col(HeldDelivery.source))
                )
            ).all()
        )
        if not due:
            return
        window = await window_for(session, user_id)
        later = None if window is None else window.until(max(now(), due_by))
        if later is not None and later > due_by:  # quiet hours moved: quiet again until then
            await session.exec(
                update(HeldDelivery)
                .where(col(HeldDelivery.user_id) == user_id)
                .where(col(HeldDelivery.release_at) <= due_by)
                .values(release_at=later)
            )
            _schedule(uow, user_id, later)
            log.info("%d held notification(s) held again until %s", len(due), later)
            for row in due:
                after_commit(session, self.metrics.released.labels(row.channel, "held_again").inc)
            return
        choices = await choices_of(session, user_id)
        for row in due:
            outcome = await self._deliver(row, uow, dispatcher, choices)
            after_commit(session, self.metrics.released.labels(row.channel, outcome).inc)
        await session.exec(
            delete(HeldDelivery)
            .where(col(HeldDelivery.user_id) == user_id)
            .where(col(HeldDelivery.release_at) <= due_by)
        )

    @staticmethod
    async def _deliver(
        row: HeldDelivery,
        uow: UnitOfWork,
        dispatcher: Dispatcher,
        choices: dict[tuple[Category, ChannelName], bool],
    ) -> str:
        channel = dispatcher.channel(row.channel)
        category = next((c for c in CATEGORIES if c == row.category), None)
        if channel is None or category is None:  # a channel no longer built: nothing to do
            log.warning("held %s for unknown channel %s dropped", row.source, row.channel)
            return "switched_off"
        if not enabled(category, channel.name, choices):
            log.info("held %s: %s was switched off meanwhile", row.source, row.channel)
            return "switched_off"
        notice = Notice(
            user_id=row.user_id,
            category=category,
            title=row.title,
            body=row.body,
            url=row.url,
            source=row.source,
            event_id=row.event_id,
        )
        await channel.deliver(notice, uow)
        return "delivered"


async def set_quiet_hours(uow: UnitOfWork, user_id: str, window: QuietWindow | None) -> None:
    """Store the user's quiet hours (None: none) and bring held rows forward if they now end
    sooner. The caller holds the user's inbox lock."""
    session = uow.session
    row = await session.get(QuietHoursRow, user_id)
    if window is None:
        if row is not None:
            await session.delete(row)
    else:
        start, end, zone = window.show()
        if row is None:
            row = QuietHoursRow(user_id=user_id, start=start, end=end, time_zone=zone)
        else:
            row.start, row.end, row.time_zone, row.updated_at = start, end, zone, now()
        session.add(row)
    await session.flush()
    moment = now()
    until = None if window is None else window.until(moment)
    sooner = until or moment
    waiting = await session.exec(
        select(HeldDelivery.source)
        .where(col(HeldDelivery.user_id) == user_id)
        .where(col(HeldDelivery.release_at) > sooner)
        .limit(1)
    )
    if waiting.first() is None:
        return
    await session.exec(
        update(HeldDelivery)
        .where(col(HeldDelivery.user_id) == user_id)
        .where(col(HeldDelivery.release_at) > sooner)
        .values(release_at=sooner)
    )
    _schedule(uow, user_id, sooner, at_once=until is None)
    log.info("held notifications of %s brought forward to %s", user_id, sooner)
