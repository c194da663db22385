"""Test support for quiet hours and digests: the handlers and jobs as the runtime calls them, and
the app on the real broker, stopped and started again on the same database and queues."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.envelope import CloudEvent, new_event, parse_event
from tributary.contracts.events import NotificationJobV1
from tributary.messaging import context
from tributary.messaging.bus import Handlers
from tributary.messaging.db import OutboxRow
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import (
    OutcomeRecorder,
    SweepRecorder,
    delete_prefixed,
    isolated_settings,
)
from tributary.messaging.topology import Names
from tributary.messaging.uow import UnitOfWork
from tributary.notification.app import create_app
from tributary.notification.channels import Dispatcher, Email, InApp, Notice, UnsubscribeLinks
from tributary.notification.digest import Digests
from tributary.notification.handlers import event_handlers
from tributary.notification.jobs import Jobs
from tributary.notification.metrics import NotificationMetrics
from tributary.notification.models import Notification
from tributary.notification.preferences import ChannelName
from tributary.notification.quiet import QuietHours
from tributary.notification.quiet_models import Digest, DigestItem, HeldDelivery
from tributary.notification.quiet_window import show_time
from tributary.notification.streams import Streams
from tributary.service.testing import running

from .harness import KEY, as_runtime_delivers
from .service import PUBLIC_URL, NotificationService, settings_for


class Recording:
    """A channel that keeps what it delivers, once per user and source as every channel does
    (it stands for any channel but in-app and email: holding is the dispatcher's, the same for
    every channel)."""

    name: ChannelName = "webhook"

    def __init__(self) -> None:
        self.delivered: list[Notice] = []

    async def deliver(self, notice: Notice, uow: UnitOfWork) -> None:
        if uow.suppress_side_effects:
            return
        if any((n.user_id, n.source) == (notice.user_id, notice.source) for n in self.delivered):
            return
        self.delivered.append(notice)


def clock(at: datetime) -> str:
    """What an aware datetime's own clock shows, as the API writes it (``HH:MM[:SS]``)."""
    return show_time(at.time().replace(microsecond=0))


class Deferred:
    """The event handlers with quiet hours and digests, the job handlers, and what they wrote."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], *, window_seconds: float = 600
    ) -> None:
        self.sessions = sessions
        self.metrics = NotificationMetrics()
        self.quiet = QuietHours(self.metrics)
        self.digests = Digests(window_seconds, self.metrics)
        self.other = Recording()
        links = UnsubscribeLinks(public_url=PUBLIC_URL, key=KEY, ttl_seconds=3600)
        self.dispatcher = Dispatcher(
            [InApp(Streams()), Email(links), self.other],
            holder=self.quiet,
            collector=self.digests,
        )
        self.handlers: Handlers = event_handlers(self.dispatcher)
        self.jobs = Jobs()
        self.jobs.register("deliver", self.quiet.job(self.dispatcher))
        self.jobs.register("digest", self.digests.job(self.dispatcher))
        self.sweeps = SweepRecorder()

    def _context(self, event: CloudEvent[Any], replay: bool) -> context.MessageContext:
        return context.MessageContext(
            correlation_id="corr-test",
            causation_id=event.id,
            event_id=event.id,
            event_type=event.type,
            consumer="notification",
            is_replay=replay,
        )

    async def handle(self, event: CloudEvent[Any], *, replay: bool = False) -> None:
        event = as_runtime_delivers(event, self.handlers)
        handler = self.handlers[type(event.data)]
        with context.use(self._context(event, replay)):
            async with UnitOfWork(
                self.sessions(), "/services/notification", sweeper=self.sweeps
            ) as uow:
                await handler(event, uow)
                await uow.commit()

    async def run(self, job: NotificationJobV1, *, replay: bool = False) -> None:
        """Handle one job command as its consumer does (its own transaction)."""
        event = new_event(routing_key=job.routing_key, source="/services/notification", data=job)
        with context.use(self._context(event, replay)):
            async with UnitOfWork(self.sessions(), "/services/notification") as uow:
                await self.jobs.handle(event, uow)
                await uow.commit()

    async def in_uow(self) -> UnitOfWork:
        return UnitOfWork(self.sessions(), "/services/notification", sweeper=self.sweeps)

    async def scheduled(self, job: str | None = None) -> list[tuple[NotificationJobV1, datetime]]:
        """The jobs staged, with when they are due, in order of staging."""
        async with self.sessions() as session:
            rows = await session.exec(
                select(OutboxRow)
                .where(col(OutboxRow.routing_key) == "notification.job.v1")
                .order_by(col(OutboxRow.seq))
            )
            found = [
                (
                    NotificationJobV1.model_validate(parse_event(r.body).data),
                    (r.deliver_at or r.created_at).replace(tzinfo=UTC),
                )
                for r in rows.all()
            ]
        return [(j, at) for j, at in found if job is None or j.job == job]

    async def emails(self, user_id: str | None = None) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            rows = await session.exec(
                select(OutboxRow)
                .where(col(OutboxRow.routing_key) == "email.send.v1")
                .order_by(col(OutboxRow.seq))
            )
            found = [parse_event(row.body).data for row in rows.all()]
        return [c for c in found if user_id is None or c.get("user_id") == user_id]

    async def inbox(self, user_id: str) -> list[Notification]:
        async with self.sessions() as session:
            query = (
                select(Notification)
                .where(col(Notification.user_id) == user_id)
                .order_by(col(Notification.seq))
            )
            return list((await session.exec(query)).all())

    async def held(self, user_id: str) -> list[HeldDelivery]:
        async with self.sessions() as session:
            query = select(HeldDelivery).where(col(HeldDelivery.user_id) == user_id)
            return list((await session.exec(query)).all())

    async def digests_of(self, user_id: str) -> list[tuple[Digest, list[DigestItem]]]:
        async with self.sessions() as session:
            digests = (
                await session.exec(
                    select(Digest)
                    .where(col(Digest.user_id) == user_id)
                    .order_by(col(Digest.opened_at))
                )
            ).all()
            found = []
            for digest in digests:
                items = (
                    await session.exec(
                        select(DigestItem).where(col(DigestItem.digest_id) == digest.id)
                    )
                ).all()
                found.append((digest, list(items)))
        return found


def job(kind: str, ref: str, user_id: str) -> NotificationJobV1:
    return NotificationJobV1(job=kind, ref=ref, user_id=user_id)  # type: ignore[arg-type]


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


# -- the app, restartable ----------------------------------------------------------------------


@dataclass
class Restartable:
    """The app on one database and one set of queues, stopped and started again at will."""

    database_url: str
    broker_url: str
    messaging: MessagingSettings
    settings: dict[str, Any]
    probe: str = ""
    queues: list[str] = field(default_factory=list)
    """Every queue the app's bus declares (deleted at the end)."""
    current: NotificationService | None = None
    starts: int = 0
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack)

    @property
    def service(self) -> NotificationService:
        assert self.current is not None, "not running"
        return self.current

    async def start(self) -> NotificationService:
        assert self.current is None
        app = create_app(settings_for(self.database_url, **self.settings), self.messaging)
        recorder = OutcomeRecorder()
        stack = AsyncExitStack()
        client = await stack.enter_async_context(running(app))
        app.state.bus.listeners.append(recorder)
        self.queues = app.state.bus.queue_names()
        self._stack = stack
        names = Names(self.messaging.name_prefix)
        if not self.probe:  # the exchange exists now: bind the probe once, for every start
            self.probe = f"{names.prefix}probe.email.send"
            connection = await aio_pika.connect(self.broker_url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(self.probe)
                await queue.bind(names.exchange, "email.send.#")
        self.current = NotificationService(
            app, client, recorder, names, self.broker_url, self.probe
        )
        self.starts += 1
        return self.current

    async def stop(self) -> None:
        """A clean stop, as a deploy does (consumers end, the relay hands its lease back)."""
        assert self.current is not None
        self.current = None
        await self._stack.aclose()

    async def restart(self) -> NotificationService:
        await self.stop()
        return await self.start()


@asynccontextmanager
async def restartable(
    database_url: str, broker_url: str, *, messaging: dict[str, Any] | None = None, **settings: Any
) -> AsyncIterator[Restartable]:
    bus = isolated_settings(broker_url, **(messaging or {}))
    runner = Restartable(database_url, broker_url, bus, settings)
    await runner.start()
    try:
        yield runner
    finally:
        if runner.current is not None:
            await runner.stop()
        await delete_prefixed(broker_url, Names(bus.name_prefix), [runner.probe, *runner.queues])
