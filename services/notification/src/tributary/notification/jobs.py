"""Deferred work: ``notification.job`` commands the service sends itself.

A job is staged in the outbox with ``deliver_at`` (a scheduled row, see the messaging runtime),
so it commits with the state that needs it and survives restarts; the relay publishes it when
due, and the service's own command queue delivers it here, to the handler registered for its
``job`` (``deliver``: notifications held by quiet hours; ``digest``: a digest window closed;
``webhook_attempt``: a webhook delivery attempt). Handlers are idempotent: a job can arrive
twice (at least once), late, or after the thing it is about has gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from tributary.contracts.envelope import Event
from tributary.contracts.events import NotificationJobV1
from tributary.messaging.bus import Handlers
from tributary.messaging.errors import PermanentError
from tributary.messaging.uow import UnitOfWork

JobHandler = Callable[[NotificationJobV1, UnitOfWork], Awaitable[None]]
JobKind = str


class Jobs:
    """The registry of job handlers and the one command handler that dispatches to them."""

    def __init__(self) -> None:
        self._handlers: dict[JobKind, JobHandler] = {}

    def register(self, job: JobKind, handler: JobHandler) -> None:
        if job in self._handlers:
            raise ValueError(f"a handler for job {job!r} is registered already")
        self._handlers[job] = handler

    @staticmethod
    def schedule(
        uow: UnitOfWork,
        job: JobKind,
        ref: str,
        *,
        at: datetime | None,
        user_id: str | None = None,
        key: str | None = None,
    ) -> None:
        """Stage ``job`` about ``ref`` for ``at`` (``None``: at once) in ``uow``'s transaction.

        ``key`` (default ``<job>:<ref>``) is the command's idempotency key: two jobs with one key
        are one job to the inbox, so give a job that may legitimately run again (a retry) a
        key of its own (e.g. with the attempt number).
        """
        payload = NotificationJobV1(job=job, ref=ref, user_id=user_id)  # type: ignore[arg-type]
        uow.outbox.add(
            payload,
            subject=f"users/{user_id}" if user_id else None,
            idempotency_key=f"notification.job:{key or f'{job}:{ref}'}",
            deliver_at=at,
        )

    async def handle(self, event: Event[NotificationJobV1], uow: UnitOfWork) -> None:
        handler = self._handlers.get(event.data.job)
        if handler is None:  # a job kind this version does not know: keep it, visibly
            raise PermanentError(f"no handler for notification job {event.data.job!r}")
        await handler(event.data, uow)

    def command_handlers(self) -> Handlers:
        return {NotificationJobV1: self.handle}
