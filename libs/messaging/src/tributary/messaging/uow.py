"""Unit of work: domain rows and outbox rows commit in one transaction."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from opentelemetry import propagate
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.catalog import catalog
from tributary.contracts.envelope import MAX_BODY_BYTES, CloudEvent, new_event
from tributary.contracts.events import Payload
from tributary.contracts.validation import flat_check, validate
from tributary.messaging import context
from tributary.messaging.db import OutboxRow, as_utc, utcnow
from tributary.messaging.erasure import (
    DEFAULT_CHUNK,
    PersonMatcher,
    SweepCounts,
    Sweeper,
    purge_outbox,
)


class Outbox:
    """Collects events to publish; they are written into the session's transaction."""

    def __init__(self, session: AsyncSession, source: str) -> None:
        self._session = session
        self._source = source
        self.added = 0

    def add(
        self,
        payload: Payload,
        *,
        subject: str | None = None,
        idempotency_key: str | None = None,
        event_id: str | None = None,
        deliver_at: datetime | None = None,
        partition_key: str | None = None,
        sequence: int | None = None,
    ) -> CloudEvent[Payload]:
        """Validate ``payload`` strictly and stage it, with the current correlation and trace.

        ``partition_key`` (the ``partitionkey`` extension) names the entity whose events must
        be handled in order; for a partitioned type it defaults to ``subject`` and chooses the
        routing key's slot (:mod:`tributary.messaging.partitions`). ``sequence`` (the
        ``sequence`` extension) is the event's position among its entity's events, for
        consumers that check the order themselves (:mod:`tributary.messaging.sequence`).

        ``deliver_at`` schedules the event: the relay publishes it once that time has come,
        never before (at least once, like every event; later by up to the relay's poll
        interval when another process wrote it, or after an outage). A naive datetime is
        taken as UTC; ``None`` or a time already passed publishes at once.
        """
        ctx = context.current()
        data = payload.model_dump(mode="json", exclude_none=True)
        check = flat_check(payload.routing_key, "strict")
        if check is not None:  # the same verdict as jsonschema's, at a part of its cost
            check(data)
        else:
            validate(payload.routing_key, data, "strict")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        event = new_event(
            routing_key=payload.routing_key,
            source=self._source,
            data=payload,
            subject=subject,
            idempotencykey=idempotency_key,
            correlationid=ctx.correlation_id or context.new_correlation_id(),
            causationid=ctx.causation_id,
            event_id=event_id,
            partitionkey=partition_key
            or (subject if catalog().type(payload.event_type).partitioned else None),
            sequence=sequence,
        )
        if tp := carrier.get("traceparent"):
            event = event.model_copy(update={"traceparent": tp})
        body = event.to_bytes()
        if len(body) > MAX_BODY_BYTES:  # every consumer would dead-letter it as malformed
            raise ValueError(
                f"{payload.routing_key} event of {len(body)} bytes exceeds {MAX_BODY_BYTES}"
            )
        created_at = utcnow()
        not_before = None if deliver_at is None else as_utc(deliver_at).replace(tzinfo=None)
        self._session.add(
            OutboxRow(
                event_id=event.id,
                routing_key=payload.routing_key,
                body=body,
                trace_headers=json.dumps(carrier),
                correlation_id=event.correlationid,
                created_at=created_at,
                deliver_at=not_before if not_before and not_before > created_at else None,
            )
        )
        self.added += 1
        return event


@dataclass(frozen=True)
class Erased:
    """What :meth:`UnitOfWork.erase_person` removed from the runtime's stores."""

    outbox: int
    """Outbox rows deleted (in the unit of work's transaction)."""
    dead_letters: SweepCounts
    """What the sweep of the service's dead-letter queues did."""


class UnitOfWork:
    """``async with uow: …; await uow.commit()`` — state and outbox commit together.

    Handlers receive one that the runtime commits (with the inbox row) after they return.
    """

    def __init__(
        self,
        session: AsyncSession,
        source: str,
        on_commit: Callable[[], Any] | None = None,
        *,
        sweeper: Sweeper | None = None,
    ) -> None:
        self.session = session
        self.outbox = Outbox(session, source)
        self._on_commit = on_commit
        self._sweeper = sweeper

    async def purge_person_from_outbox(
        self, user_id: str, *, also: Iterable[str] = (), chunk: int = DEFAULT_CHUNK
    ) -> int:
        """Delete this service's outbox rows that mention the person (their user id or one
        of ``also``, e.g. addresses), ``user.erased`` rows excepted, in this transaction."""
        return await purge_outbox(self.session, PersonMatcher(user_id, also), chunk=chunk)

    async def erase_person(
        self, user_id: str, *, also: Iterable[str] = (), chunk: int = DEFAULT_CHUNK
    ) -> Erased:
        """Erase the person from the runtime's stores: sweep the service's dead-letter queues,
        then purge its outbox in this transaction (see :mod:`tributary.messaging.erasure`).

        Pass every address or other identifying string the service knows for the person in
        ``also`` (at least six characters each; names are better left out, another person
        may share one). The sweep runs first, before the transaction writes anything, so it
        holds no lock; a broker failure raises :class:`InfrastructureError`: the delivery
        is kept and handled again, so the erasure is retried, never skipped.
        """
        if self._sweeper is None:
            raise RuntimeError("this unit of work has no dead-letter sweeper (not from a bus)")
        matcher = PersonMatcher(user_id, also)
        swept = await self._sweeper(matcher)
        purged = await purge_outbox(self.session, matcher, chunk=chunk)
        return Erased(outbox=purged, dead_letters=swept)

    @property
    def suppress_side_effects(self) -> bool:
        """A replay not forced by the operator: skip irreversible side effects (mail, money)."""
        ctx = context.current()
        return ctx.is_replay and not ctx.replay_forced

    @property
    def is_replay(self) -> bool:
        """True while handling a replayed delivery: suppress irreversible side effects."""
        return context.current().is_replay

    async def commit(self) -> None:
        await self.session.commit()
        if self.outbox.added and self._on_commit is not None:
            self._on_commit()
        self.outbox.added = 0

    async def rollback(self) -> None:
        await self.session.rollback()
        self.outbox.added = 0

    async def __aenter__(self) -> UnitOfWork:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # uncommitted work is rolled back, never committed by accident
        await self.rollback()
        await self.session.close()
