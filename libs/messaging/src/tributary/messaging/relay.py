"""The outbox relay: publishes committed outbox rows and marks them after the broker's confirm.

Each batch is claimed in commit (``seq``) order but its confirms are awaited concurrently, and a
row that fails is retried later: consumers must not rely on the order of events.

The relay is built to keep going. Every step (``claim``, ``publish``, ``mark``, ``purge``)
that fails is counted and retried with backoff; :meth:`OutboxRelay.supervise` restarts
:meth:`OutboxRelay.run` if it ends anyway; :meth:`OutboxRelay.health` reports a relay that
makes no progress while rows wait. A row the broker returns (no queue bound) or refuses is
retried with exponential backoff, then **parked** after ``RelayPolicy.max_attempts``: it blocks
nothing behind it and waits for an operator (``eventctl outbox parked`` / ``resend``).
A broker or database outage does not count toward a row's attempts.

A **scheduled** row (``deliver_at``, see ``Outbox.add``) is never published before its time;
the relay sleeps until the earliest one comes due (at most ``outbox_poll_seconds``), claims
due rows before the others and never reads the rows not due yet (the claim index starts with
``published_at, parked_at, deliver_at``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

import aio_pika
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from sqlalchemy import ColumnElement, and_, case, delete, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from tributary.contracts.catalog import NAMESPACE
from tributary.messaging import context
from tributary.messaging.db import (
    InboxRow,
    OutboxLease,
    OutboxRow,
    is_sqlite,
    session_factory,
    utcnow,
)
from tributary.messaging.errors import InfrastructureError, Unroutable
from tributary.messaging.partitions import wire_routing_key
from tributary.messaging.publisher import Publisher, PublishRefused, event_message
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names

log = logging.getLogger("tributary.messaging.relay")
tracer = trace.get_tracer("tributary.messaging")

LEASE_SECONDS = 15.0
_HALF_LEASE = timedelta(seconds=LEASE_SECONDS / 2)
FIRST_PURGE_SECONDS = 30.0
"""The first purge runs this soon after start (or ``outbox_purge_seconds`` if shorter), so
services that restart often still purge."""

Step = Literal["claim", "publish", "mark", "purge"]
STEPS: tuple[Step, ...] = ("claim", "publish", "mark", "purge")


@dataclass(frozen=True)
class RelayPolicy:
    """How hard the relay tries: per row, per step, and when it counts as stalled."""

    max_attempts: int = 10
    """Publishes of one row that the broker returns or refuses before the row is parked."""
    row_retry_seconds: float = 2.0
    """A failed row waits this long, doubled per attempt (2, 4, 8, … s), before its next try."""
    row_retry_max_seconds: float = 300.0
    step_backoff_seconds: float = 0.2
    """First wait after a failed step (or a restart); doubled per failure, with jitter."""
    step_backoff_max_seconds: float = 30.0
    stall_seconds: float = 30.0
    """Not healthy when rows wait and no batch completed for this long."""

    def row_delay(self, attempts: int) -> float:
        """Seconds before the next try of a row that has failed ``attempts`` times."""
        return min(self.row_retry_seconds * 2.0 ** (attempts - 1), self.row_retry_max_seconds)


@dataclass
class RelayStats:
    published: int = 0
    unroutable: int = 0
    """Publishes the broker returned (no queue bound to the routing key)."""
    refused: int = 0
    """Publishes the broker nacked, and rows that failed for a reason of their own."""
    parked: int = 0
    """Rows this relay parked."""
    purged: int = 0
    inbox_purged: int = 0
    step_failures: dict[Step, int] = field(default_factory=lambda: dict.fromkeys(STEPS, 0))
    restarts: int = 0
    """Times :meth:`OutboxRelay.supervise` restarted a relay loop that had ended."""
    last_publish_at: float | None = None
    """Unix time of the last confirmed publish."""
    last_error: str | None = None


@dataclass(frozen=True)
class RelayGauges:
    """The outbox as metrics show it (read from the database)."""

    waiting: int
    """Rows not yet published and not parked (including rows backing off after a failure),
    scheduled rows not due yet excluded."""
    oldest_waiting_age: float | None
    """Seconds since the oldest waiting row was committed (a scheduled row: since it came
    due)."""
    parked: int
    last_publish_at: float | None
    scheduled: int
    """Unpublished, unparked rows whose ``deliver_at`` is still to come."""
    overdue_seconds: float
    """How long ago the oldest scheduled row that is due but unpublished (and not parked) came
    due; 0 when there is none."""


class Purged(NamedTuple):
    outbox: int
    inbox: int


@dataclass
class _Tally:
    """What one mark did; added to the stats once its transaction has committed."""

    published: int = 0
    unroutable: int = 0
    refused: int = 0
    parked: int = 0


class _Backoff:
    """Exponential backoff with jitter (0.5 to 1.5 times the current delay)."""

    def __init__(self, first: float, cap: float) -> None:
        self._first, self._cap = first, cap
        self._delay = first

    def next(self) -> float:
        delay = self._delay * (0.5 + random.random())  # noqa: S311 (jitter, not a secret)
        self._delay = min(self._delay * 2, self._cap)
        return delay

    def reset(self) -> None:
        self._delay = self._first


def _unsent() -> list[ColumnElement[bool]]:
    return [col(OutboxRow.published_at).is_(None), col(OutboxRow.parked_at).is_(None)]


def _not_backing_off(now: datetime) -> ColumnElement[bool]:
    return or_(col(OutboxRow.next_attempt_at).is_(None), col(OutboxRow.next_attempt_at) <= now)


_INDEX_ORDER = (
    col(OutboxRow.published_at),
    col(OutboxRow.parked_at),
    col(OutboxRow.deliver_at),
    col(OutboxRow.seq),
)
"""The columns of ``ix_tributary_outbox_waiting``, which the claims read in order."""


def outbox_message(row: OutboxRow, *, app_id: str, headers: dict[str, Any]) -> aio_pika.Message:
    """The AMQP message for an outbox row (the relay's and ``eventctl outbox resend``'s)."""
    return event_message(
        row.body,
        event_id=row.event_id,
        routing_key=row.routing_key,
        app_id=app_id,
        correlation_id=row.correlation_id,
        timestamp=row.created_at,
        headers=headers,
    )


def _is_outage(result: BaseException | None) -> bool:
    """A broker failure that is not the row's fault (a nack concerns its destination)."""
    return isinstance(result, InfrastructureError) and not isinstance(result, PublishRefused)


def _describe(exc: BaseException) -> str:
    """``Type: message``, short: a database error without its SQL and parameters."""
    if isinstance(exc, StatementError) and exc.orig is not None:
        return f"{type(exc).__name__}: {type(exc.orig).__name__}: {exc.orig}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


class OutboxRelay:
    """Runs inside the service; ``notify()`` after a commit wakes it at once.

    The bus runs :meth:`supervise`; tests may drive :meth:`drain_once` and :meth:`purge`.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        *,
        service: str,
        names: Names,
        settings: MessagingSettings,
        policy: RelayPolicy | None = None,
    ) -> None:
        self._engine = engine
        self._sessions = session_factory(engine)
        self._publisher = publisher
        self._service = service
        self._names = names
        self._settings = settings
        self.policy = policy or RelayPolicy()
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._owner = uuid.uuid4().hex
        self._sqlite = is_sqlite(engine)
        self._lease_until: datetime | None = None
        self._next_due: datetime | None = None
        """When the earliest scheduled row comes due, read by the last claim of a drain."""
        self._last_progress = time.monotonic()
        self.stats = RelayStats()
        self.healthy = True
        """False from a failed step until the next batch completes."""

    def notify(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        self._wake.set()

    # -- the loops ------------------------------------------------------------------------

    async def supervise(self) -> None:
        """Run :meth:`run` until :meth:`stop`, restarting it (with backoff) whenever it ends.

        On stop, an SQLite lease still held is handed back: a replacement process (a restart,
        a deploy) publishes at once instead of waiting for the lease to run out."""
        backoff = self._step_backoff()
        self._last_progress = time.monotonic()  # a stall is counted from the start, not __init__
        while not self._stopping:
            started = time.monotonic()
            try:
                await self.run()
            except Exception as exc:
                self.stats.last_error = f"relay: {_describe(exc)}"
                log.exception("outbox relay ended by %s; restarting it", type(exc).__name__)
            else:
                if self._stopping:
                    break
                log.error("outbox relay ended without stop(); restarting it")
            self.stats.restarts += 1
            self.healthy = False
            if time.monotonic() - started > self.policy.step_backoff_max_seconds:
                backoff.reset()  # it had been running well: this is a fresh failure
            await self._pause(backoff.next())
        await self._hand_back_lease()

    async def run(self) -> None:
        """Publish until :meth:`stop`; a failed step is counted and retried with backoff."""
        loop = asyncio.get_running_loop()
        purge_every = self._settings.outbox_purge_seconds
        next_purge = loop.time() + min(FIRST_PURGE_SECONDS, purge_every)
        purge_backoff = self._step_backoff()
        purging: asyncio.Task[bool] | None = None
        backoff = self._step_backoff()
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self._drain()
                except Exception:  # counted by the step that failed
                    self.healthy = False
                    await self._pause(backoff.next())
                    continue
                self.healthy = True
                backoff.reset()
                if self._stopping:  # stop() came during the drain, which cleared its wake-up
                    break
                if purging is not None and purging.done():
                    ok = purging.result()
                    purging = None
                    if ok:
                        purge_backoff.reset()
                    # a failed purge is tried again soon, never later than on schedule
                    delay = purge_every if ok else min(purge_backoff.next(), purge_every)
                    next_purge = loop.time() + delay
                if purging is None and loop.time() >= next_purge:
                    # its own task: a long purge must not hold up publishing
                    purging = asyncio.create_task(self._purge_round(), name="outbox-purge")
                    next_purge = float("inf")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_seconds())
        finally:
            if purging is not None:
                if not self._stopping:
                    purging.cancel()
                # on stop() it ends after its current chunk (cancelling a statement midway
                # would leave its connection unreturned); a cancel of this task still ends it
                await asyncio.wait([purging])
                if not purging.cancelled():
                    purging.exception()  # retrieved: the loop ends either way

    async def _purge_round(self) -> bool:
        try:
            await self.purge()
        except Exception:  # counted by the purge step; the loop schedules a retry
            return False
        return True

    async def _drain(self) -> None:
        """Publish batches until one comes back short and no commit arrived meanwhile."""
        while not self._stopping:
            claimed = await self._batch()
            if claimed < self._settings.outbox_batch and not self._wake.is_set():
                return
            self._wake.clear()

    def _idle_seconds(self) -> float:
        """Until the next poll, or until the earliest scheduled row comes due if sooner."""
        poll = self._settings.outbox_poll_seconds
        if self._next_due is None:
            return poll
        return min(poll, max((self._next_due - utcnow()).total_seconds(), 0.0))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on :meth:`stop`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    def _step_backoff(self) -> _Backoff:
        return _Backoff(self.policy.step_backoff_seconds, self.policy.step_backoff_max_seconds)

    @contextlib.contextmanager
    def _step(self, step: Step) -> Iterator[None]:
        """Count a failure of ``step`` (and keep its reason for :meth:`health`)."""
        try:
            yield
        except Exception as exc:
            self._failed(step, exc)
            raise

    def _failed(self, step: Step, exc: BaseException) -> None:
        self.stats.step_failures[step] += 1
        self.stats.last_error = f"{step}: {_describe(exc)}"
        log.warning("outbox relay step %s failed: %s", step, _describe(exc))

    # -- one batch ------------------------------------------------------------------------

    def _ready(self, now: datetime) -> list[ColumnElement[bool]]:
        """Rows to publish now: unpublished, not parked, not backing off, due."""
        return [
            *_unsent(),
            _not_backing_off(now),
            or_(col(OutboxRow.deliver_at).is_(None), col(OutboxRow.deliver_at) <= now),
        ]

    def _claim_query(
        self, due: ColumnElement[bool], now: datetime, limit: int
    ) -> SelectOfScalar[OutboxRow]:
        # ordered as the index is: the equal (NULL) leading columns leave the order of
        # (deliver_at, seq), so both databases read the index in order and stop at the limit
        # (with ORDER BY seq alone PostgreSQL may scan the primary key through every published
        # and every not-yet-due row instead)
        return (
            select(OutboxRow)
            .where(*_unsent(), due, _not_backing_off(now))
            .order_by(*_INDEX_ORDER)
            .limit(limit)
        )

    async def _claim(self, session: AsyncSession, *, lock: bool) -> list[OutboxRow]:
        """Up to ``outbox_batch`` rows in ``seq`` order: scheduled rows due by now (the earliest
        due first), then rows to publish at once (the oldest first). On PostgreSQL ``lock``
        takes them FOR UPDATE SKIP LOCKED. A short batch also reads when the next scheduled
        row comes due."""
        now = utcnow()
        limit = self._settings.outbox_batch
        due = col(OutboxRow.deliver_at) <= now
        immediate = col(OutboxRow.deliver_at).is_(None)
        rows: list[OutboxRow] = []
        for which in (due, immediate):
            query = self._claim_query(which, now, limit - len(rows))
            if lock:
                query = query.with_for_update(skip_locked=True)
            rows += (await session.exec(query)).all()
            if len(rows) >= limit:
                break
        else:  # the last batch of this drain
            upcoming = (
                select(OutboxRow.deliver_at)
                .where(*_unsent(), col(OutboxRow.deliver_at) > now)
                .order_by(*_INDEX_ORDER[:3])
                .limit(1)
            )
            self._next_due = (await session.exec(upcoming)).first()
        return sorted(rows, key=lambda row: row.seq or 0)

    async def drain_once(self) -> int:
        """Publish one batch of waiting rows; returns how many were published.

        Raises the failure of a step (after counting it): a database error of the claim or the
        mark, or the :class:`InfrastructureError` of a broker that failed the publishes.
        """
        before = self.stats.published
        await self._batch()
        return self.stats.published - before

    async def _batch(self) -> int:
        """Claim, publish and mark one batch; returns how many rows were claimed."""
        self._next_due = None  # until a claim reads it (not when another relay holds the lease)
        if self._sqlite:
            claimed = await self._batch_sqlite()
        else:
            claimed = await self._batch_postgres()
        self._last_progress = time.monotonic()
        return claimed

    async def _batch_postgres(self) -> int:
        # the claimed rows stay locked (SKIP LOCKED for other replicas) until they are marked;
        # row locks do not block the service's own writes, and the publisher's confirm timeout
        # bounds how long they are held
        tally: _Tally | None = None
        async with self._sessions() as session:
            with self._step("claim"):
                rows: Sequence[OutboxRow] = await self._claim(session, lock=True)
                if not rows:
                    await session.rollback()
                    return 0
            results = await self._publish_all(rows)
            with contextlib.suppress(Exception), self._step("mark"):  # counted; marked again
                pending_tally = await self._record(session, rows, results)
                await session.commit()
                tally = pending_tally
        # outside the claim's session: its row locks must be gone before a new transaction
        # marks the same rows
        if tally is None:
            tally = await self._mark_again(rows, results)
        self._count(tally)
        self._raise_outage(results)
        return len(rows)

    async def _batch_sqlite(self) -> int:
        # the lease makes this the only relay; read, then publish outside any transaction so
        # the service's writers are not held up by the confirms
        with self._step("claim"):
            async with self._sessions() as session, session.begin():
                if not await self._hold_lease(session):
                    return 0
                rows = await self._claim(session, lock=False)
        if not rows:
            return 0
        results = await self._publish_all(rows)
        outage = any(_is_outage(r) for r in results)
        tally: _Tally | None = None
        with contextlib.suppress(Exception), self._step("mark"):  # counted; marked again below
            async with self._sessions() as session, session.begin():
                pending_tally = await self._record(session, rows, results)
                if outage:  # let a healthy replica take over at once
                    await self._give_up_lease(session)
            tally = pending_tally
        if tally is None:
            tally = await self._mark_again(rows, results)
        self._count(tally)
        self._raise_outage(results)
        return len(rows)

    async def _mark_again(
        self, rows: Sequence[OutboxRow], results: list[BaseException | None]
    ) -> _Tally:
        """The mark failed: retry it in fresh transactions, else every published row would be
        sent again. Gives up only on :meth:`stop` (the rows are then sent again: duplicates
        that consumers drop)."""
        self.healthy = False
        backoff = self._step_backoff()
        while True:
            await self._pause(backoff.next())
            if self._stopping:
                raise InfrastructureError("database", "stopped before the batch was marked")
            try:
                with self._step("mark"):
                    async with self._sessions() as session, session.begin():
                        tally = await self._record(session, rows, results)
                return tally
            except Exception:  # noqa: S112 (logged and counted by _step; the loop retries)
                continue

    def _count(self, tally: _Tally) -> None:
        stats = self.stats
        stats.unroutable += tally.unroutable
        stats.refused += tally.refused
        stats.parked += tally.parked
        if tally.published:
            stats.published += tally.published
            stats.last_publish_at = time.time()

    def _raise_outage(self, results: list[BaseException | None]) -> None:
        outage = next((r for r in results if _is_outage(r)), None)
        if outage is not None:
            self._failed("publish", outage)
            raise outage

    async def _publish_all(self, rows: Sequence[OutboxRow]) -> list[BaseException | None]:
        return await asyncio.gather(*(self._publish(row) for row in rows), return_exceptions=True)

    async def _record(
        self,
        session: AsyncSession,
        rows: Sequence[OutboxRow],
        results: list[BaseException | None],
    ) -> _Tally:
        """Mark confirmed rows published; charge rows that failed on their own an attempt.

        Idempotent, so a mark that failed can be run again: a published row keeps its first
        time, and an attempt is charged only to a row still at the count read by the claim.
        """
        now = utcnow()
        tally = _Tally()
        done = [row.seq for row, res in zip(rows, results, strict=True) if res is None]
        if done:
            await session.exec(
                update(OutboxRow)
                .where(col(OutboxRow.seq).in_(done))
                .where(col(OutboxRow.published_at).is_(None))
                .values(published_at=now)
            )
            tally.published = len(done)
        for row, res in zip(rows, results, strict=True):
            if res is not None and not _is_outage(res):
                await self._charge(session, row, res, now, tally)
        return tally

    async def _charge(
        self,
        session: AsyncSession,
        row: OutboxRow,
        error: BaseException,
        now: datetime,
        tally: _Tally,
    ) -> None:
        attempts = row.attempts + 1
        park = attempts >= self.policy.max_attempts
        retry_at = None if park else now + timedelta(seconds=self.policy.row_delay(attempts))
        result = await session.exec(
            update(OutboxRow)
            .where(col(OutboxRow.seq) == row.seq)
            .where(col(OutboxRow.attempts) == row.attempts)
            .values(
                attempts=attempts,
                last_error=_describe(error),
                next_attempt_at=retry_at,
                parked_at=now if park else None,
            )
        )
        if not result.rowcount:
            return  # charged already by the mark that failed after all
        if isinstance(error, Unroutable):
            tally.unroutable += 1
        else:
            tally.refused += 1
        if park:
            tally.parked += 1
            log.error(
                "outbox event %s parked after %d attempts: %s",
                row.event_id,
                attempts,
                _describe(error),
            )
        else:
            log.warning(
                "outbox event %s kept for retry %d/%d: %s",
                row.event_id,
                attempts + 1,
                self.policy.max_attempts,
                _describe(error),
            )

    async def _publish(self, row: OutboxRow) -> None:
        parent = propagate.extract(json.loads(row.trace_headers or "{}"))
        scope = context.MessageContext(
            correlation_id=row.correlation_id,
            event_id=row.event_id,
            event_type=f"{NAMESPACE}.{row.routing_key}",
        )
        with (
            context.use(scope),
            tracer.start_as_current_span(
                f"publish {row.routing_key}",
                context=parent,
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "publish",
                    "messaging.destination.name": self._names.exchange,
                    "messaging.rabbitmq.destination.routing_key": row.routing_key,
                    "messaging.message.id": row.event_id,
                    "messaging.message.conversation_id": row.correlation_id or "",
                },
            ),
        ):
            headers: dict[str, Any] = {}
            propagate.inject(headers)
            message = outbox_message(row, app_id=self._service, headers=headers)
            # a partitioned type travels under its slot: <type>.v<N>.s<slot>
            routing_key = wire_routing_key(row.routing_key, row.body)
            await self._publisher.publish(self._names.exchange, routing_key, message)

    async def _hold_lease(self, session: AsyncSession) -> bool:
        now = utcnow()
        if self._lease_until is not None and now < self._lease_until - _HALF_LEASE:
            return True  # ours for a while yet: no write needed on this drain
        expires = now + timedelta(seconds=LEASE_SECONDS)
        result = await session.exec(
            update(OutboxLease)
            .where(col(OutboxLease.name) == "relay")
            .where(or_(col(OutboxLease.owner) == self._owner, col(OutboxLease.expires_at) < now))
            .values(owner=self._owner, expires_at=expires)
        )
        if result.rowcount:
            self._lease_until = expires
            return True
        if await session.get(OutboxLease, "relay") is None:
            session.add(OutboxLease(name="relay", owner=self._owner, expires_at=expires))
            await session.flush()
            self._lease_until = expires
            return True
        self._lease_until = None
        return False

    async def _hand_back_lease(self) -> None:
        """Give the SQLite lease up if this relay holds it (on stop; a failure is only logged:
        the lease then runs out by itself)."""
        if not self._sqlite or self._lease_until is None:
            return
        try:
            async with self._sessions() as session, session.begin():
                await self._give_up_lease(session)
        except Exception as exc:
            log.warning("outbox relay could not hand its lease back: %s", _describe(exc))

    async def _give_up_lease(self, session: AsyncSession) -> None:
        self._lease_until = None
        await session.exec(
            update(OutboxLease)
            .where(col(OutboxLease.owner) == self._owner)
            .values(expires_at=utcnow())
        )

    # -- purge ----------------------------------------------------------------------------

    async def purge(self) -> Purged:
        """Delete outbox rows published before the replay window and inbox rows older than the
        inbox retention, ``purge_chunk`` rows per statement (and transaction)."""
        cutoff = utcnow() - timedelta(hours=self._settings.outbox_replay_window_hours)
        outbox = await self._delete_in_chunks(
            col(OutboxRow.seq), col(OutboxRow.published_at) < cutoff
        )
        self.stats.purged += outbox
        cutoff = utcnow() - timedelta(days=self._settings.inbox_retention_days)
        inbox = await self._delete_in_chunks(col(InboxRow.key), col(InboxRow.processed_at) < cutoff)
        self.stats.inbox_purged += inbox
        if outbox or inbox:
            log.info("purged %d outbox and %d inbox rows", outbox, inbox)
        return Purged(outbox, inbox)

    async def _delete_in_chunks(self, key: Any, condition: ColumnElement[bool]) -> int:
        chunk = self._settings.purge_chunk
        table = key.table
        total = 0
        while True:
            with self._step("purge"):
                async with self._sessions() as session, session.begin():
                    ids = select(key).where(condition).limit(chunk).scalar_subquery()
                    result = await session.exec(delete(table).where(key.in_(ids)))
            deleted = int(result.rowcount or 0)
            total += deleted
            if deleted < chunk or self._stopping:
                return total
            await asyncio.sleep(0)  # let the relay and the service's requests in between

    # -- what metrics and readiness read ---------------------------------------------------

    async def gauges(self) -> RelayGauges:
        """Rows waiting, the age of the oldest, rows parked, rows scheduled, how long the
        oldest due scheduled row is overdue, the last publish (one query)."""
        now = utcnow()
        unparked = col(OutboxRow.parked_at).is_(None)
        deliver_at = col(OutboxRow.deliver_at)
        waiting = and_(unparked, or_(deliver_at.is_(None), deliver_at <= now))
        scheduled = and_(unparked, deliver_at > now)
        overdue = and_(unparked, deliver_at <= now)
        query = sa_select(
            func.coalesce(func.sum(case((waiting, 1), else_=0)), 0),
            # a scheduled row waits from the time it came due
            func.min(case((waiting, func.coalesce(deliver_at, col(OutboxRow.created_at))))),
            func.coalesce(func.sum(case((unparked, 0), else_=1)), 0),
            func.coalesce(func.sum(case((scheduled, 1), else_=0)), 0),
            func.min(case((overdue, deliver_at))),
        ).where(col(OutboxRow.published_at).is_(None))
        async with self._engine.connect() as conn:
            count, oldest, parked, future, first_due = (await conn.execute(query)).one()
        age = (now - oldest).total_seconds() if oldest is not None else None
        return RelayGauges(
            waiting=int(count),
            oldest_waiting_age=age,
            parked=int(parked),
            last_publish_at=self.stats.last_publish_at,
            scheduled=int(future),
            overdue_seconds=(now - first_due).total_seconds() if first_due is not None else 0.0,
        )

    async def pending(self) -> tuple[int, float | None]:
        """How many rows wait (parked rows excluded), and the age in seconds of the oldest."""
        gauges = await self.gauges()
        return gauges.waiting, gauges.oldest_waiting_age

    async def health(self) -> tuple[bool, str | None]:
        """Not healthy when rows are ready to publish and no batch completed for
        ``policy.stall_seconds``; the reason says how long and the last error."""
        stalled = time.monotonic() - self._last_progress
        if stalled <= self.policy.stall_seconds:
            return True, None
        try:
            async with self._sessions() as session:
                query = select(func.count()).select_from(OutboxRow).where(*self._ready(utcnow()))
                ready = int((await session.exec(query)).one())
        except Exception as exc:
            return False, (
                f"outbox relay: no progress for {stalled:.0f} s and the outbox is not readable "
                f"({type(exc).__name__})"
            )
        if not ready:
            return True, None
        reason = f"outbox relay: no progress for {stalled:.0f} s with {ready} rows waiting"
        if self.stats.last_error:
            reason += f" (last error: {self.stats.last_error[:300]})"
        return False, reason
