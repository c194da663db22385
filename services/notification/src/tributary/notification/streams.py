"""Waking the live streams of a user when a notification for them is committed.

The streams never receive notifications from here: a wake-up only tells a user's streams to
read the database (``seq`` after the last one each has sent). So a notification reaches each
stream once, however often its event is redelivered, and a wake-up that comes too early (the
commit failed) or twice costs one query. Wake-ups are per process: a notification committed by
another replica is found by the streams' periodic read (``NOTIFICATION_SSE_POLL_SECONDS``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session
from sqlmodel.ext.asyncio.session import AsyncSession

log = logging.getLogger("tributary.notification.streams")

_PENDING = "tributary.notification.wake"
_LISTENING = "tributary.notification.wake.listening"


class TooManyStreams(Exception):
    """The user holds as many open streams as one process allows."""


class StreamsClosed(Exception):
    """The service is shutting down: no new stream."""


class Streams:
    """The open streams of this process, by user id."""

    def __init__(self, per_user: int = 10) -> None:
        self.per_user = per_user
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.closed = False

    def open(self) -> None:
        """At start-up (again, after a restart of the same app)."""
        self.closed = False

    @contextmanager
    def subscribe(self, user_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``user_id`` may have new notifications, or on shutdown."""
        if self.closed:
            raise StreamsClosed
        waiters = self._waiters.setdefault(user_id, set())
        if len(waiters) >= self.per_user:
            raise TooManyStreams
        wake = asyncio.Event()
        waiters.add(wake)
        try:
            yield wake
        finally:
            waiters.discard(wake)
            if not waiters:
                self._waiters.pop(user_id, None)

    def wake(self, user_id: str) -> None:
        for waiter in self._waiters.get(user_id, ()):
            waiter.set()

    def count(self, user_id: str | None = None) -> int:
        if user_id is not None:
            return len(self._waiters.get(user_id, ()))
        return sum(len(w) for w in self._waiters.values())

    def close(self) -> None:
        """Shutdown: every stream ends (its client reconnects elsewhere with Last-Event-ID)."""
        self.closed = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.set()

    async def aclose(self) -> None:
        self.close()


def wake_after_commit(session: AsyncSession, streams: Streams, user_id: str) -> None:
    """Wake ``user_id``'s streams once ``session``'s transaction has committed (never before:
    a stream that read the database earlier would not see the row yet; never after a
    rollback)."""
    info = session.info
    if _LISTENING not in info:
        info[_LISTENING] = True

        def committed(sync_session: Session) -> None:
            for user in sync_session.info.pop(_PENDING, ()):
                streams.wake(user)

        def rolled_back(sync_session: Session) -> None:
            sync_session.info.pop(_PENDING, None)

        sa_event.listen(session.sync_session, "after_commit", committed)
        sa_event.listen(session.sync_session, "after_rollback", rolled_back)
    info.setdefault(_PENDING, set()).add(user_id)
