"""Channels: how a notification reaches a user, and the dispatcher that picks them.

A channel is anything with a ``name`` (one of :data:`~tributary.notification.preferences.
CHANNELS`) and ``deliver(notice, uow)``. Each delivers **at most once per notice source, user
and channel** whatever the redeliveries, replays and duplicate announcements, and only when the
dispatcher found the channel on for the notice's category (preferences are read in the same
transaction, so a channel switched off before a redelivery is not used by it).

* ``in_app``: a row in ``notifications`` (unique per user and source) and a wake-up of the
  user's live streams once the transaction commits;
* ``email``: an ``email.send`` command staged in the outbox, never a call to the email
  service; a ``deliveries`` row keeps it from being staged twice. Not on a replay (unless the
  operator forces it): mail is irreversible;
* ``webhook``: signed deliveries to the user's endpoints (:mod:`tributary.notification.webhooks`).

Two hooks of the dispatcher change *when* or *how* a channel delivers, for every channel alike:

* **quiet hours** (:mod:`tributary.notification.quiet`): a notice that is not urgent, arriving
  while its user is in quiet hours, is held for every channel but the silent ones (in-app:
  stored and streamed at once) and delivered by that channel when they end;
* **digests** (:mod:`tributary.notification.digest`): the email of a mention joins the user's
  open digest instead of being sent on its own.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.events import EmailSendV1
from tributary.messaging.erasure import was_erased
from tributary.messaging.uow import UnitOfWork
from tributary.notification import tokens
from tributary.notification.models import Address, Delivery, InboxHead, Notification
from tributary.notification.preferences import (
    Category,
    ChannelName,
    Choices,
    enabled,
    is_critical,
)
from tributary.notification.store import choices_of, lock_inbox
from tributary.notification.streams import Streams, wake_after_commit

log = logging.getLogger("tributary.notification")

_REQUEST_IDS = uuid.UUID("5b0b4c6e-2f0e-4a53-9a8c-6f1d2b7e9c41")
"""Namespace of the ``email.send`` request ids (UUIDv5 of source, user and channel)."""


@dataclass(frozen=True)
class Notice:
    """One notification for one user, before any channel delivered it."""

    user_id: str
    category: Category
    title: str
    body: str
    source: str
    """What it is about, the same however it is announced: ``report.ready:{report_id}``."""
    event_id: str
    url: str | None = None
    urgent: bool = False


class Channel(Protocol):
    name: ChannelName

    async def deliver(self, notice: Notice, uow: UnitOfWork) -> None: ...


class RecipientNotYetKnown(Exception):
    """Transient on purpose: the user's user.created may still be on its way or retrying."""


class InApp:
    """The inbox: one row per user and source; the user's streams woken after commit."""

    name: ChannelName = "in_app"

    def __init__(self, streams: Streams) -> None:
        self.streams = streams

    async def deliver(self, notice: Notice, uow: UnitOfWork) -> None:
        session = uow.session
        known = await session.exec(
            select(Notification.seq)
            .where(col(Notification.user_id) == notice.user_id)
            .where(col(Notification.source) == notice.source)
        )
        if known.first() is not None:
            log.info("in-app notification for %s exists: not made again", notice.source)
            return
        seq = await lock_inbox(session, notice.user_id) + 1
        await session.exec(
            update(InboxHead).where(col(InboxHead.user_id) == notice.user_id).values(last_seq=seq)
        )
        session.add(
            Notification(
                user_id=notice.user_id,
                seq=seq,
                category=notice.category,
                urgent=notice.urgent,
                title=notice.title,
                body=notice.body,
                url=notice.url,
                source=notice.source,
                event_id=notice.event_id,
            )
        )
        await session.flush()
        wake_after_commit(session, self.streams, notice.user_id)


@dataclass(frozen=True)
class UnsubscribeLinks:
    """Signed one-click unsubscribe URLs: ``{public_url}/unsubscribe?token=…``."""

    public_url: str
    key: bytes
    ttl_seconds: float

    def url(self, user_id: str, category: Category) -> str:
        token = tokens.mint(user_id, category, key=self.key, ttl_seconds=self.ttl_seconds)
        return f"{self.public_url.rstrip('/')}/unsubscribe?token={token}"


class Email:
    """An ``email.send`` command through the outbox, with a one-click unsubscribe link for
    every category but the critical ones (their mail cannot be unsubscribed from)."""

    name: ChannelName = "email"

    def __init__(self, links: UnsubscribeLinks) -> None:
        self.links = links

    async def deliver(self, notice: Notice, uow: UnitOfWork) -> None:
        if uow.suppress_side_effects:
            log.info("replayed delivery: %s email not sent", notice.category)
            return
        session = uow.session
        key = (notice.user_id, notice.source, self.name)
        if await session.get(Delivery, key) is not None:
            log.info("%s email for %s was staged before: not again", notice.category, notice.source)
            return
        recipient = await session.get(Address, notice.user_id)
        if recipient is None:
            raise RecipientNotYetKnown(
                f"no address known for user {notice.user_id} yet: "
                "its user.created has not been handled"
            )
        request_id = uuid.uuid5(_REQUEST_IDS, f"{notice.source}|{notice.user_id}|{self.name}")
        unsubscribe = (
            None
            if is_critical(notice.category, self.name)  # a mail that cannot be switched off
            else self.links.url(notice.user_id, notice.category)
        )
        uow.outbox.add(
            EmailSendV1(
                request_id=request_id,
                to=recipient.email,
                template="notification",
                subject=notice.title,
                variables={"text": notice.body, "url": notice.url or ""},
                user_id=notice.user_id,
                locale=recipient.locale,
                list_unsubscribe_url=unsubscribe,
            ),
            subject=f"users/{notice.user_id}",
            idempotency_key=f"email.send:{request_id}",
        )
        session.add(
            Delivery(
                user_id=notice.user_id,
                source=notice.source,
                channel=self.name,
                category=notice.category,
                event_id=notice.event_id,
                reference=str(request_id),
            )
        )
        await session.flush()


SILENT: frozenset[ChannelName] = frozenset({"in_app"})
"""Channels quiet hours never hold: a row in the inbox makes no sound (an open app shows it)."""


class Holder(Protocol):
    """Quiet hours, as the dispatcher uses them."""

    async def quiet_until(self, session: AsyncSession, user_id: str) -> datetime | None:
        """When the user's quiet hours end if they are in them now, else None."""
        ...

    async def hold(
        self, notice: Notice, channel: ChannelName, until: datetime, uow: UnitOfWork
    ) -> None:
        """Keep ``notice`` for ``channel`` and deliver it at ``until``."""
        ...


class Collector(Protocol):
    """Digests, as the dispatcher uses them."""

    def collects(self, notice: Notice, channel: ChannelName) -> bool:
        """Whether ``notice`` goes into a digest instead of through ``channel`` at once."""
        ...

    async def collect(self, notice: Notice, uow: UnitOfWork) -> None: ...


class Dispatcher:
    """Sends a notice through every channel its user has on for its category: at once, held
    until the user's quiet hours end (``holder``), or into a digest (``collector``)."""

    def __init__(
        self,
        channels: Sequence[Channel],
        *,
        holder: Holder | None = None,
        collector: Collector | None = None,
    ) -> None:
        self.channels = list(channels)
        self.holder = holder
        self.collector = collector

    def channel(self, name: str) -> Channel | None:
        return next((c for c in self.channels if c.name == name), None)

    async def notify(self, notice: Notice, uow: UnitOfWork) -> list[ChannelName]:
        """The channels that were asked to deliver (each may find it delivered before)."""
        if await was_erased(uow.session, notice.user_id):
            log.info("%s for erased user %s: nothing stored or sent", notice.source, notice.user_id)
            return []
        # first: every later read about the user waits for a competing transaction to end
        await lock_inbox(uow.session, notice.user_id)
        choices: Choices = await choices_of(uow.session, notice.user_id)
        until = await self._quiet_until(notice, uow)
        used: list[ChannelName] = []
        for channel in self.channels:
            if not enabled(notice.category, channel.name, choices):
                log.info("%s: %s is off for %s", notice.source, channel.name, notice.category)
                continue
            if self.collector is not None and self.collector.collects(notice, channel.name):
                if uow.suppress_side_effects:  # its digest would send it
                    log.info("replayed delivery: %s not added to a digest", notice.source)
                else:
                    await self.collector.collect(notice, uow)
            else:
                await self._deliver(notice, channel, uow, until)
            used.append(channel.name)
        return used

    async def send(self, notice: Notice, name: ChannelName, uow: UnitOfWork) -> bool:
        """Deliver ``notice`` through one channel alone (a digest's email), if the user has it
        on; held if they are in quiet hours. Whether it was on."""
        channel = self.channel(name)
        if channel is None or await was_erased(uow.session, notice.user_id):
            return False
        await lock_inbox(uow.session, notice.user_id)
        if not enabled(notice.category, name, await choices_of(uow.session, notice.user_id)):
            log.info("%s: %s is off for %s", notice.source, name, notice.category)
            return False
        await self._deliver(notice, channel, uow, await self._quiet_until(notice, uow))
        return True

    async def _quiet_until(self, notice: Notice, uow: UnitOfWork) -> datetime | None:
        if self.holder is None or notice.urgent:  # urgent notices are never held
            return None
        return await self.holder.quiet_until(uow.session, notice.user_id)

    async def _deliver(
        self, notice: Notice, channel: Channel, uow: UnitOfWork, until: datetime | None
    ) -> None:
        if until is None or channel.name in SILENT or self.holder is None:
            await channel.deliver(notice, uow)
        elif uow.suppress_side_effects:  # the held delivery would send it
            log.info("replayed delivery: %s %s not held", notice.source, channel.name)
        else:
            await self.holder.hold(notice, channel.name, until, uow)
