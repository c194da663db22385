"""The handlers as the runtime calls them: one delivery, one committed transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.envelope import CloudEvent, parse_event
from tributary.contracts.upcasting import upcast
from tributary.messaging import context
from tributary.messaging.bus import Handlers
from tributary.messaging.db import OutboxRow
from tributary.messaging.testing import SweepRecorder
from tributary.messaging.uow import UnitOfWork
from tributary.notification.channels import Dispatcher, Email, InApp, UnsubscribeLinks
from tributary.notification.handlers import event_handlers
from tributary.notification.models import Notification
from tributary.notification.streams import Streams

from .service import KEY as TEXT_KEY
from .service import PUBLIC_URL

KEY = TEXT_KEY.encode()


def as_runtime_delivers(event: CloudEvent[Any], handlers: Handlers) -> CloudEvent[Any]:
    """An older version upcast to the one the handler takes, as the consumer does."""
    payload = type(event.data)
    if payload in handlers:
        return event
    [wanted] = [t for t in handlers if t.event_type == payload.event_type]
    data = upcast(
        payload.event_type, payload.version, event.data.model_dump(mode="json"), wanted.version
    )
    return event.model_copy(update={"data": wanted.model_validate(data)})


class Service:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.streams = Streams()
        self.links = UnsubscribeLinks(public_url=PUBLIC_URL, key=KEY, ttl_seconds=3600)
        self.handlers: Handlers = event_handlers(
            Dispatcher([InApp(self.streams), Email(self.links)])
        )
        self.sweeps = SweepRecorder()

    async def handle(
        self, event: CloudEvent[Any], *, replay: bool = False, forced: bool = False
    ) -> None:
        event = as_runtime_delivers(event, self.handlers)
        handler = self.handlers[type(event.data)]
        ctx = context.MessageContext(
            correlation_id="corr-test",
            causation_id=event.id,
            event_id=event.id,
            event_type=event.type,
            consumer="notification",
            is_replay=replay,
            replay_forced=forced,
        )
        with context.use(ctx):
            async with UnitOfWork(
                self.sessions(), "/services/notification", sweeper=self.sweeps
            ) as uow:
                await handler(event, uow)
                await uow.commit()

    async def inbox(self, user_id: str) -> list[Notification]:
        async with self.sessions() as session:
            query = (
                select(Notification)
                .where(col(Notification.user_id) == user_id)
                .order_by(col(Notification.seq))
            )
            return list((await session.exec(query)).all())

    async def commands(self, user_id: str | None = None) -> list[dict[str, Any]]:
        """The ``email.send`` commands staged, as their ``data`` (for ``user_id`` if given)."""
        async with self.sessions() as session:
            rows = await session.exec(
                select(OutboxRow)
                .where(col(OutboxRow.routing_key) == "email.send.v1")
                .order_by(col(OutboxRow.seq))
            )
            found = [parse_event(row.body).data for row in rows.all()]
        return [c for c in found if user_id is None or c.get("user_id") == user_id]
