"""The write side: load a subscription from its stream, let it decide, append what it decided
with the integration events and the projections' updates, all in one transaction.

``Billing.execute`` runs a command in a unit of work and retries it when another writer
appended to the subscription first (``ConcurrencyConflict``), for commands that may be
retried: it loads the stream again and decides again, so nothing is lost and nothing is
done twice. The first attempt is optimistic (reads and decides without a lock, the append
checks the version); a retry takes the store's append lock before it reads, so it cannot
meet another writer again and a burst of writers on one subscription all get through, one
after the other. A command that may not be retried (one made on a version the client saw:
``If-Match``) lets the conflict through: 409 over HTTP. Bus handlers raise the conflict and
the messaging runtime retries the delivery.

``save`` also stages the saga's own steps (``billing.saga`` commands to billing itself) that
the appended events call for, in the same transaction: ``ActivationTimeoutScheduled`` → the
``activation_timeout`` step, delivered at its ``due_at`` (a scheduled outbox row);
``CompensationStarted`` → the ``refund`` step, at once. Each is staged with the one event
that calls for it, so at most once per subscription; its handling is idempotent anyway.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TypeVar

from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing import crypto, events
from tributary.billing.events import DomainEvent
from tributary.billing.eventstore import ConcurrencyConflict, EventStore, NewEvent, StoredEvent
from tributary.billing.metrics import BillingMetrics
from tributary.billing.models import StreamIndex
from tributary.billing.projections import Projector
from tributary.billing.saga import REFUND_STEP, TIMEOUT_STEP
from tributary.billing.subscription import Subscription
from tributary.contracts.events import (
    BillingSagaV1,
    PaymentFailedV1,
    PaymentRefundedV1,
    PaymentSucceededV1,
    SubscriptionCancelledV1,
)
from tributary.messaging import context
from tributary.messaging.bus import Bus
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.billing")

T = TypeVar("T")


def payment_id_for(checkout_id: str) -> str:
    """Billing's payment id for the provider's checkout: one checkout is paid at most once,
    so the id derives from it (identity derives its subscription id from this one)."""
    return f"pay_{hashlib.sha256(f'checkout:{checkout_id}'.encode()).hexdigest()[:24]}"


DEFAULT_ACTIVATION_TIMEOUT = timedelta(seconds=300)


class Billing:
    def __init__(
        self,
        store: EventStore,
        projector: Projector,
        metrics: BillingMetrics,
        *,
        retries: int,
        activation_timeout: timedelta = DEFAULT_ACTIVATION_TIMEOUT,
    ) -> None:
        self.store = store
        self.projector = projector
        self.metrics = metrics
        self.retries = retries
        self.activation_timeout = activation_timeout
        """How long identity has to activate a paid plan before the saga refunds it."""

    async def load(self, session: AsyncSession, subscription_id: str) -> Subscription:
        """The subscription as its stream says (an empty one: ``exists`` is False)."""
        subscription = Subscription(subscription_id)
        for stored in await self.store.read_stream(session, subscription_id):
            domain = events.parse(stored.type, stored.data)
            subscription.apply(domain, stored.version, stored.recorded_at)
            if isinstance(domain, events.SubscriptionRequested):
                subscription.user_id = await crypto.open_sealed(
                    session, domain.user, crypto.aad(subscription_id, "user")
                )
        return subscription

    async def find(self, session: AsyncSession, kind: str, key: str) -> str | None:
        """The subscription a payment id (``kind="payment"``) belongs to."""
        found = await session.get(StreamIndex, (kind, key))
        return None if found is None else found.stream_id

    async def save(
        self,
        uow: UnitOfWork,
        subscription: Subscription,
        decided: Sequence[DomainEvent],
        *,
        expected_version: int | None = None,
        cause: str | None = None,
    ) -> list[StoredEvent]:
        """Append ``decided`` (after ``expected_version``, default the version loaded), stage
        the integration events they imply and update the projections: all in ``uow``."""
        if not decided:
            return []
        ctx = context.current()
        metadata = {
            "correlation_id": ctx.correlation_id,
            "causation_id": cause or ctx.causation_id,
        }
        stored = await self.store.append(
            uow.session,
            subscription.id,
            subscription.version if expected_version is None else expected_version,
            [NewEvent(e.name, events.dump(e), e.schema_version, metadata) for e in decided],
        )
        for domain, row in zip(decided, stored, strict=True):
            subscription.apply(domain, row.version, row.recorded_at)
            await self._index(uow.session, subscription, domain)
            self._announce(uow, subscription, domain)
            self._schedule(uow, subscription, domain)
        await self.projector.apply(uow.session, stored)
        return stored

    async def _index(
        self, session: AsyncSession, subscription: Subscription, domain: DomainEvent
    ) -> None:
        if not isinstance(domain, events.PaymentSucceeded | events.PaymentFailed):
            return
        if await session.get(StreamIndex, ("payment", domain.payment_id)) is None:
            session.add(
                StreamIndex(kind="payment", key=domain.payment_id, stream_id=subscription.id)
            )

    def _schedule(self, uow: UnitOfWork, subscription: Subscription, domain: DomainEvent) -> None:
        """Stage the saga step a domain event calls for (whether or not the user was erased:
        the money goes back all the same)."""
        if isinstance(domain, events.ActivationTimeoutScheduled):
            step, at = TIMEOUT_STEP, domain.due_at
        elif isinstance(domain, events.CompensationStarted):
            step, at = REFUND_STEP, None
        else:
            return
        uow.outbox.add(
            BillingSagaV1(step=step, subscription_id=subscription.id),
            subject=f"subscriptions/{subscription.id}",
            idempotency_key=f"billing.saga:{step}:{subscription.id}",
            deliver_at=at,
        )

    def _announce(self, uow: UnitOfWork, subscription: Subscription, domain: DomainEvent) -> None:
        """Stage the integration event a domain event implies (in the same transaction)."""
        user_id = subscription.user_id
        if user_id is None:
            log.info(
                "subscription %s: %s announces nothing (user erased)", subscription.id, domain.name
            )
            return
        subject = f"subscriptions/{subscription.id}"
        if isinstance(domain, events.PaymentSucceeded) and not domain.late:
            uow.outbox.add(
                PaymentSucceededV1(
                    payment_id=domain.payment_id,
                    user_id=user_id,
                    amount_cents=domain.amount_cents,
                    currency=domain.currency,
                    plan=domain.plan,
                    provider_reference=domain.provider_payment_id,
                    paid_at=domain.paid_at,
                ),
                subject=subject,
                idempotency_key=f"payment.succeeded:{domain.payment_id}",
            )
        elif isinstance(domain, events.PaymentFailed):
            uow.outbox.add(
                PaymentFailedV1(
                    payment_id=domain.payment_id,
                    user_id=user_id,
                    amount_cents=domain.amount_cents,
                    currency=domain.currency,
                    reason=domain.reason,
                    failed_at=domain.failed_at,
                ),
                subject=subject,
                idempotency_key=f"payment.failed:{domain.payment_id}",
            )
        elif isinstance(domain, events.Refunded):
            uow.outbox.add(
                PaymentRefundedV1(
                    payment_id=domain.payment_id,
                    user_id=user_id,
                    amount_cents=domain.amount_cents,
                    currency=domain.currency,
                    provider_reference=domain.refund_id,
                    full=domain.full,
                    reason=domain.reason,
                    refunded_at=domain.refunded_at,
                ),
                subject=subject,
                idempotency_key=f"payment.refunded:{domain.refund_id}",
            )
        elif isinstance(domain, events.Cancelled):
            uow.outbox.add(
                SubscriptionCancelledV1(
                    subscription_id=subscription.id,
                    user_id=user_id,
                    plan=subscription.plan,
                    reason=domain.reason,
                    payment_id=domain.payment_id,
                    cancelled_at=domain.cancelled_at,
                ),
                subject=subject,
                idempotency_key=f"subscription.cancelled:{subscription.id}",
            )

    async def execute(
        self,
        bus: Bus,
        name: str,
        command: Callable[[UnitOfWork], Awaitable[T]],
        *,
        retry: bool = True,
    ) -> T:
        """Run ``command`` in a unit of work and commit; on a conflict, run it again (at most
        ``retries`` times) when ``retry``, else raise the conflict."""
        attempt = 0
        while True:
            attempt += 1
            async with bus.unit_of_work() as uow:
                try:
                    if attempt > 1:  # met another writer: this time, in turn
                        await self.store.lock(uow.session)
                    result = await command(uow)
                    await uow.commit()
                    return result
                except ConcurrencyConflict:
                    if not retry or attempt >= self.retries:
                        self.metrics.conflicts.labels(name, "refused").inc()
                        raise
                    self.metrics.conflicts.labels(name, "retried").inc()
