"""``GET /users/{user_id}/notifications/stream``: the inbox live, as Server-Sent Events.

Each notification is one event: ``event: notification``, ``id:`` its id (the user's sequence
number), ``data:`` the notification as JSON. A stream reads the database for notifications
with an id above the last one it sent -- when a notification for the user is committed in
this process (at once), and every ``NOTIFICATION_SSE_POLL_SECONDS`` (those committed by
another replica) -- so each appears on it once, in order, however often its event was
delivered.

* Resuming: a client sends ``Last-Event-ID`` (browsers do when they reconnect) or
  ``?after=<id>``; the stream first replays every notification after it from the database.
  Without either it starts with the next new notification.
* Heartbeats: a comment line (``: heartbeat``) when nothing was sent for
  ``NOTIFICATION_SSE_HEARTBEAT_SECONDS``; the first line says ``retry:`` (reconnect delay).
* The stream ends when the access token it was opened with expires (reconnect with a new one
  and ``Last-Event-ID``), and when the service shuts down (``: closing``), before the server
  waits for connections to drain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.notification.models import Notification
from tributary.notification.schemas import MAX_SEQ, NotificationPublic, UserIdPath
from tributary.notification.settings import Settings
from tributary.notification.streams import Streams, StreamsClosed, TooManyStreams
from tributary.service.auth import Principal, require
from tributary.service.problems import Problem, invalid

router = APIRouter(tags=["notifications"])

BATCH = 100


def parse_last_event_id(value: str) -> int:
    """A stream event id (``0`` … 2⁶³-1, ASCII digits); ValueError for anything else."""
    text = value.strip(" ")
    if not text or len(text) > 19 or not text.isascii() or not text.isdigit():
        raise ValueError("not an event id")
    number = int(text)
    if number > MAX_SEQ:
        raise ValueError("not an event id")
    return number


def _resume_from(
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=40,
            description="The id of the last event received: the stream resumes after it",
        ),
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="Like Last-Event-ID, for a first connection"),
    ] = None,
) -> int | None:
    if last_event_id is not None:
        try:
            return parse_last_event_id(last_event_id)
        except ValueError:
            raise invalid(
                "header.Last-Event-ID", "is not an event id of this stream", "event_id"
            ) from None
    return after


async def _subscribed(request: Request, user_id: UserIdPath) -> AsyncIterator[asyncio.Event]:
    """The stream's wake-up, held for as long as the response lasts."""
    streams: Streams = request.app.state.streams
    try:
        with streams.subscribe(user_id) as wake:
            yield wake
    except TooManyStreams:
        raise Problem(
            429,
            f"The user has {streams.per_user} streams open here already; close one first.",
            headers={"Retry-After": "5"},
        ) from None
    except StreamsClosed:
        raise Problem(
            503, "The service is shutting down; reconnect.", headers={"Retry-After": "1"}
        ) from None


async def _after(
    sessions: async_sessionmaker[AsyncSession], user_id: str, seq: int
) -> list[Notification]:
    async with sessions() as session:
        query = (
            select(Notification)
            .where(col(Notification.user_id) == user_id)
            .where(col(Notification.seq) > seq)
            .order_by(col(Notification.seq))
            .limit(BATCH)
        )
        return list((await session.exec(query)).all())


async def _head(sessions: async_sessionmaker[AsyncSession], user_id: str) -> int:
    async with sessions() as session:
        query = select(func.max(Notification.seq)).where(col(Notification.user_id) == user_id)
        return int((await session.exec(query)).one() or 0)


@router.get(
    "/users/{user_id}/notifications/stream",
    response_class=EventSourceResponse,
    responses={200: {"description": "`text/event-stream`: one event per notification"}},
)
async def stream_notifications(
    request: Request,
    user_id: UserIdPath,
    principal: Annotated[Principal, require("notifications:read", owner="user_id")],
    resume: Annotated[int | None, Depends(_resume_from)],
    wake: Annotated[asyncio.Event, Depends(_subscribed)],
) -> AsyncIterator[ServerSentEvent]:
    """The user's new notifications as they arrive (Server-Sent Events); see the module doc."""
    settings: Settings = request.app.state.notification_settings
    streams: Streams = request.app.state.streams
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    ends_at = principal.expires_at.timestamp()
    last = resume if resume is not None else await _head(sessions, user_id)
    yield ServerSentEvent(comment="connected", retry=settings.sse_retry_ms)
    quiet_since = time.monotonic()
    while not streams.closed:
        wake.clear()  # before reading: a commit after this read wakes the wait below
        rows = await _after(sessions, user_id, last)
        for row in rows:
            yield ServerSentEvent(
                event="notification", id=str(row.seq), data=NotificationPublic.of(row)
            )
            last = row.seq
        if rows:
            quiet_since = time.monotonic()
            if len(rows) == BATCH:
                continue
        left = ends_at - time.time()
        if left <= 0:
            yield ServerSentEvent(comment="token expired")
            return
        heartbeat_in = quiet_since + settings.sse_heartbeat_seconds - time.monotonic()
        if heartbeat_in <= 0:
            yield ServerSentEvent(comment="heartbeat")
            quiet_since = time.monotonic()
            continue
        try:
            async with asyncio.timeout(min(settings.sse_poll_seconds, heartbeat_in, left)):
                await wake.wait()
        except TimeoutError:
            pass
    yield ServerSentEvent(comment="closing")
