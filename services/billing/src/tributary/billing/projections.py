"""Read models, updated in the transaction that appends the events they follow.

Each projection has a row in ``projection_state``: the table it serves from and the last
store position applied to it. ``Projector.apply`` runs inside the append's transaction,
under the store's append lock, so positions arrive in order and each event moves the
position on exactly once: an event at or below the position is skipped (a redelivery, a
catch-up overlapping the live updates), and the table and its position commit together.

Rebuilt blue/green by ``eventctl projections rebuild <name>`` (:mod:`tributary.billing.rebuild`):
a fresh table (``proj_<name>_<n>``) is filled from position 0 in short batches while the old
one serves, caught up to the live position, then under the append lock the tail is applied
and ``table_name`` switched in one transaction; readers look the table up per request, so
they move over at the commit. Side effects never run from here: projections only write
their own tables.

Before applying freshly appended events, ``Projector.apply`` first applies whatever the store
holds between a projection's position and them (none, normally): a projection added by a
migration, or one that replicas running older code did not update, catches up rather than
skip events. The service also catches every projection up at start-up.

Personal data: ``proj_subscriptions.user_id`` (to list a user's subscriptions); an erased
user's rows keep their figures with ``user_id`` NULL, and a rebuild produces the same (the
user id no longer decrypts). ``proj_revenue`` holds plans and amounts only, ``proj_sagas``
states and reasons (no user id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import Table, insert, select, update
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing import crypto, events
from tributary.billing.eventstore import EventStore, StoredEvent
from tributary.billing.models import (
    ProjectionState,
    revenue_table,
    sagas_table,
    subscriptions_table,
)
from tributary.billing.saga import SagaFold, advance
from tributary.messaging.db import now


class Projection(Protocol):
    name: str

    def table(self, name: str) -> Table: ...

    async def apply(self, session: AsyncSession, table: Table, event: StoredEvent) -> None:
        """Fold one event into ``table`` (called once per event, in position order)."""
        ...


class SubscriptionsProjection:
    """``proj_subscriptions``: one row per subscription, by user and status."""

    name = "subscriptions"

    def table(self, name: str) -> Table:
        return subscriptions_table(name)

    async def apply(self, session: AsyncSession, table: Table, event: StoredEvent) -> None:
        domain = events.parse(event.type, event.data)
        key = table.c.subscription_id == event.stream_id
        changes: dict[str, object] = {"version": event.version, "updated_at": event.recorded_at}
        if isinstance(domain, events.SubscriptionRequested):
            user_id = await crypto.open_sealed(
                session, domain.user, crypto.aad(event.stream_id, "user")
            )
            await session.exec(
                insert(table).values(
                    subscription_id=event.stream_id,
                    user_id=user_id,
                    plan=domain.plan,
                    status="requested",
                    amount_cents=domain.amount_cents,
                    currency=domain.currency,
                    refunded_cents=0,
                    created_at=domain.requested_at,
                    **changes,
                )
            )
            return
        if isinstance(domain, events.CheckoutCreated):
            changes.update(status="pending_payment", checkout_id=domain.checkout_id)
        elif isinstance(domain, events.CheckoutFailed):
            changes.update(status="checkout_failed")
        elif isinstance(domain, events.PaymentSucceeded):
            changes.update(
                status="refund_due" if domain.late else "paid", payment_id=domain.payment_id
            )
        elif isinstance(domain, events.PaymentFailed):
            changes.update(status="payment_failed", payment_id=domain.payment_id)
        elif isinstance(domain, events.Refunded):
            changes.update(refunded_cents=table.c.refunded_cents + domain.amount_cents)
            if domain.full:
                changes.update(status="refunded")
        elif isinstance(domain, events.ActivationConfirmed):
            changes.update(status="active")
        elif isinstance(domain, events.CompensationStarted):
            changes.update(status="compensating")
        elif isinstance(domain, events.Cancelled):
            await session.exec(
                update(table).where(key, table.c.status != "refunded").values(status="cancelled")
            )
        await session.exec(update(table).where(key).values(**changes))


class RevenueProjection:
    """``proj_revenue``: per plan and currency, payments taken and refunds given."""

    name = "revenue"

    def table(self, name: str) -> Table:
        return revenue_table(name)

    async def apply(self, session: AsyncSession, table: Table, event: StoredEvent) -> None:
        domain = events.parse(event.type, event.data)
        if isinstance(domain, events.PaymentSucceeded):
            counts = {"payments": 1, "gross_cents": domain.amount_cents}
        elif isinstance(domain, events.Refunded):
            counts = {"refunds": 1, "refunded_cents": domain.amount_cents}
        else:
            return
        key = (table.c.plan == domain.plan) & (table.c.currency == domain.currency)
        found = await session.exec(select(table.c.plan).where(key))  # type: ignore[call-overload]
        if found.first() is None:
            row = {"payments": 0, "gross_cents": 0, "refunds": 0, "refunded_cents": 0, **counts}
            await session.exec(
                insert(table).values(plan=domain.plan, currency=domain.currency, **row)
            )
        else:
            await session.exec(
                update(table)
                .where(key)
                .values({name: table.c[name] + value for name, value in counts.items()})
            )


class SagasProjection:
    """``proj_sagas``: one row per subscription's saga, by state (the stuck ones:
    ``compensating``), folded with the same :func:`~tributary.billing.saga.advance` as the
    aggregate's own saga."""

    name = "sagas"

    def table(self, name: str) -> Table:
        return sagas_table(name)

    async def apply(self, session: AsyncSession, table: Table, event: StoredEvent) -> None:
        domain = events.parse(event.type, event.data)
        stamp = {"version": event.version, "updated_at": event.recorded_at}
        if isinstance(domain, events.SubscriptionRequested):
            saga = advance(SagaFold(), domain)
            await session.exec(
                insert(table).values(
                    subscription_id=event.stream_id,
                    state=saga.state,
                    reason=saga.reason,
                    pending_timeout_at=saga.pending_timeout_at,
                    **stamp,
                )
            )
            return
        key = table.c.subscription_id == event.stream_id
        found = (
            await session.exec(  # type: ignore[call-overload]
                select(table.c.state, table.c.reason, table.c.pending_timeout_at).where(key)
            )
        ).first()
        if found is None:  # a stream that never started: nothing to fold into
            return
        saga = advance(SagaFold(found.state, found.reason, found.pending_timeout_at), domain)
        await session.exec(
            update(table)
            .where(key)
            .values(
                state=saga.state,
                reason=saga.reason,
                pending_timeout_at=saga.pending_timeout_at,
                **stamp,
            )
        )


PROJECTIONS: tuple[Projection, ...] = (
    SubscriptionsProjection(),
    RevenueProjection(),
    SagasProjection(),
)


class Projector:
    def __init__(self, store: EventStore, projections: Sequence[Projection] = PROJECTIONS) -> None:
        self.store = store
        self.projections = {p.name: p for p in projections}
        self._tables: dict[tuple[str, str], Table] = {}

    def table(self, name: str, table_name: str) -> Table:
        """Projection ``name``'s table called ``table_name``, one object per name: a fresh
        ``Table`` per call would defeat SQLAlchemy's compiled-statement cache."""
        key = (name, table_name)
        if (table := self._tables.get(key)) is None:
            table = self._tables[key] = self.projections[name].table(table_name)
        return table

    async def table_of(self, session: AsyncSession, name: str) -> Table:
        """The table projection ``name`` serves from now."""
        state = await session.get(ProjectionState, name)
        if state is None:
            raise LookupError(f"no projection {name}")
        return self.table(name, state.table_name)

    async def position_of(self, session: AsyncSession, name: str) -> int:
        state = await session.get(ProjectionState, name)
        return 0 if state is None else state.position

    async def apply(self, session: AsyncSession, stored: Sequence[StoredEvent]) -> int:
        """Apply freshly appended events to every projection, in the append's transaction;
        how many applications were made (an event at or below a position is skipped). A
        projection behind the first of them gets the events in between first."""
        applied = 0
        first = min((event.position for event in stored), default=0)
        for name, projection in self.projections.items():
            state = await session.get(ProjectionState, name)
            if state is None:
                raise LookupError(f"no projection {name}")
            table = self.table(name, state.table_name)
            behind: list[StoredEvent] = []
            after = state.position
            while after < first - 1:  # events in between, or only a gap in the positions
                batch = await self.store.read_all(session, after=after, limit=500)
                earlier = [e for e in batch if e.position < first]
                behind.extend(earlier)
                if not earlier or len(earlier) < len(batch):
                    break
                after = earlier[-1].position
            for event in [*behind, *stored]:
                if event.position <= state.position:
                    continue
                await projection.apply(session, table, event)
                state.position = event.position
                applied += 1
            state.updated_at = now()
            session.add(state)
        await session.flush()
        return applied

    async def build(
        self, session: AsyncSession, name: str, table_name: str, *, batch: int = 500
    ) -> tuple[Table, int]:
        """Create ``table_name`` and fill it from the whole store, as projection ``name``
        would be after every event (the green half of a rebuild; the live table is left as
        it is). The new table and the store position it is built up to (in ``session``)."""
        table = self.table(name, table_name)
        await session.run_sync(lambda sync: table.create(sync.connection()))
        after = 0
        while stored := await self.store.read_all(session, after=after, limit=batch):
            for event in stored:
                await self.projections[name].apply(session, table, event)
            after = stored[-1].position
        return table, after

    async def catch_up(self, session: AsyncSession, *, batch: int = 500) -> int:
        """Apply whatever the projections have not seen yet, under the append lock (after a
        projection was added, or to prove nothing was missed); how many applications."""
        await self.store.lock(session)
        first = min(
            [
                int(p or 0)
                for p in (
                    await session.exec(
                        select(col(ProjectionState.position)).where(  # type: ignore[call-overload]
                            col(ProjectionState.name).in_(list(self.projections))
                        )
                    )
                ).scalars()
            ]
            or [0]
        )
        applied = 0
        while stored := await self.store.read_all(session, after=first, limit=batch):
            applied += await self.apply(session, stored)
            first = stored[-1].position
        return applied
