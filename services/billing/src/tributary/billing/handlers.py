"""What billing consumes: ``subscription.activated`` (identity activated the plan a payment
paid for: the subscription becomes active, the saga completes),
``subscription.activation_rejected`` (identity will not: the saga compensates),
``user.erased`` (crypto-shredding), and its own ``billing.saga`` commands (the activation
timeout, the refund step; see :mod:`tributary.billing.saga`).

Every handler loads the subscription, lets it decide and appends in the delivery's
transaction: a concurrent append to the same subscription raises ``ConcurrencyConflict``, the
runtime delivers the message again and the handler decides anew on the new state (no lost
update, nothing done twice). A message that matches no subscription, or a subscription whose
saga has moved past it, is logged and counted in
``tributary_billing_unmatched_messages_total{type, reason}``, never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sqlalchemy import update

from tributary.billing import crypto
from tributary.billing.commands import Billing
from tributary.billing.events import DomainEvent
from tributary.billing.metrics import BillingMetrics
from tributary.billing.provider import ProviderClient, ProviderRefused, ProviderUnavailable
from tributary.billing.saga import REFUND_STEP, TIMEOUT_STEP
from tributary.billing.subscription import InvalidTransition, Subscription
from tributary.contracts.envelope import Event
from tributary.contracts.events import (
    BillingSagaV1,
    SubscriptionActivatedV1,
    SubscriptionActivationRejectedV1,
    UserErasedV1,
)
from tributary.messaging.bus import Handlers
from tributary.messaging.db import as_utc, now
from tributary.messaging.erasure import remember_erased
from tributary.messaging.errors import PermanentError
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.billing.handlers")


def refund_key(payment_id: str) -> str:
    """The provider's Idempotency-Key of the saga's refund of ``payment_id``: one refund per
    payment however often the step runs."""
    return f"saga-refund:{payment_id}"


class SagaHandlers:
    """The saga's inputs from the bus; ``provider`` gives the provider client (made at
    start-up)."""

    def __init__(
        self, billing: Billing, metrics: BillingMetrics, provider: Callable[[], ProviderClient]
    ) -> None:
        self.billing = billing
        self.metrics = metrics
        self.provider = provider

    def _unmatched(self, kind: str, reason: str, about: str) -> None:
        log.warning("%s for %s matches no saga step: %s", kind, about, reason)
        self.metrics.unmatched.labels(kind, reason).inc()

    async def _save(
        self,
        uow: UnitOfWork,
        subscription: Subscription,
        decided: Sequence[DomainEvent],
        cause: str,
    ) -> None:
        stored = await self.billing.save(uow, subscription, decided, cause=cause)
        for event in stored:
            self.metrics.appended.labels(event.type).inc()

    async def on_activation_rejected(
        self, event: Event[SubscriptionActivationRejectedV1], uow: UnitOfWork
    ) -> None:
        """Identity will not activate the plan: a subscription still ``paid`` starts
        compensating (its refund step is staged with it). Already compensating, refunded or
        active (a rejection after the timeout, or after all): nothing, counted."""
        kind = "subscription.activation_rejected"
        rejection = event.data
        subscription_id = await self.billing.find(uow.session, "payment", rejection.payment_id)
        if subscription_id is None:
            self._unmatched(kind, "unknown_payment", rejection.payment_id)
            return
        subscription = await self.billing.load(uow.session, subscription_id)
        if uow.suppress_side_effects:  # a replay starts no refund
            log.info("replayed %s for %s: no compensation", kind, subscription_id)
            self.metrics.saga_steps.labels("activation_rejected", "suppressed").inc()
            return
        decided = subscription.activation_rejected(
            reason=rejection.reason, event_id=event.id, at=as_utc(rejection.rejected_at)
        )
        if not decided:
            self._unmatched(kind, f"status_{subscription.status}", subscription_id)
            self.metrics.saga_steps.labels("activation_rejected", "no_change").inc()
            return
        await self._save(uow, subscription, decided, event.id)
        self.metrics.saga_steps.labels("activation_rejected", "compensating").inc()
        log.info(
            "subscription %s: identity rejected the activation (%s), compensating",
            subscription_id,
            rejection.reason,
        )

    async def on_step(self, event: Event[BillingSagaV1], uow: UnitOfWork) -> None:
        step = event.data.step
        subscription = await self.billing.load(uow.session, event.data.subscription_id)
        if not subscription.exists:
            self._unmatched("billing.saga", "unknown_subscription", event.data.subscription_id)
            return
        if step == TIMEOUT_STEP:
            await self._timeout(event, uow, subscription)
        elif step == REFUND_STEP:
            await self._refund(event, uow, subscription)

    async def _timeout(
        self, event: Event[BillingSagaV1], uow: UnitOfWork, subscription: Subscription
    ) -> None:
        """Still only paid when the timeout comes: identity did not activate in time,
        compensate. Anything else (activated, compensating, ended): nothing to do. A replay
        starts no compensation (it would refund)."""
        decided = subscription.activation_timed_out(now())
        if decided and uow.suppress_side_effects:
            log.info("replayed activation timeout for %s: no compensation", subscription.id)
            self.metrics.saga_steps.labels(TIMEOUT_STEP, "suppressed").inc()
            return
        if not decided:
            log.info(
                "subscription %s: activation timeout, %s: nothing to do",
                subscription.id,
                subscription.status,
            )
            self.metrics.saga_steps.labels(TIMEOUT_STEP, "no_change").inc()
            return
        await self._save(uow, subscription, decided, event.id)
        self.metrics.saga_steps.labels(TIMEOUT_STEP, "compensating").inc()
        log.warning(
            "subscription %s: not activated within the timeout, compensating", subscription.id
        )

    async def _refund(
        self, event: Event[BillingSagaV1], uow: UnitOfWork, subscription: Subscription
    ) -> None:
        """Refund the whole payment at the provider and record it (``Refunded``, and
        ``Cancelled`` if the subscription had not ended). Once refunded (by an earlier run,
        or the provider's webhook came first): nothing. The provider unreachable: raised,
        so the runtime retries with backoff; refusing: a :class:`PermanentError` (the step
        goes to ``billing.saga.dlq`` with the reason; the saga stays ``compensating``)."""
        if subscription.status != "compensating":
            log.info(
                "subscription %s: refund step, %s: nothing to do",
                subscription.id,
                subscription.status,
            )
            self.metrics.saga_steps.labels(REFUND_STEP, "no_change").inc()
            return
        payment_id, provider_payment = subscription.payment_id, subscription.provider_payment_id
        if payment_id is None or provider_payment is None:  # compensating implies a payment
            raise PermanentError(f"subscription {subscription.id} is compensating no payment")
        if uow.suppress_side_effects:
            log.info("replayed refund step for %s: no refund", subscription.id)
            self.metrics.saga_steps.labels(REFUND_STEP, "suppressed").inc()
            return
        reason = subscription.compensation_reason or "compensation"
        try:
            refund = await self.provider().refund(
                provider_payment,
                amount_cents=None,
                reason=reason,
                idempotency_key=refund_key(payment_id),
            )
        except ProviderUnavailable:
            self.metrics.saga_steps.labels(REFUND_STEP, "unavailable").inc()
            raise
        except ProviderRefused as exc:
            self.metrics.saga_steps.labels(REFUND_STEP, "refused").inc()
            raise PermanentError(
                f"the provider refused the refund of {payment_id} (subscription "
                f"{subscription.id} stays compensating): {exc}"
            ) from None
        try:
            decided = subscription.refunded(
                refund_id=refund.id,
                provider_event_id=event.id,
                amount_cents=refund.amount_cents,
                reason=reason,
                at=as_utc(refund.created_at),
            )
        except InvalidTransition as exc:
            raise PermanentError(f"the provider's refund {refund.id}: {exc}") from None
        await self._save(uow, subscription, decided, event.id)
        self.metrics.saga_steps.labels(REFUND_STEP, "refunded" if decided else "no_change").inc()
        log.info(
            "subscription %s: refunded %d at the provider (%s%s)",
            subscription.id,
            refund.amount_cents,
            refund.id,
            ", replayed" if refund.replayed else "",
        )


def event_handlers(billing: Billing, metrics: BillingMetrics, saga: SagaHandlers) -> Handlers:
    async def on_subscription_activated(
        event: Event[SubscriptionActivatedV1], uow: UnitOfWork
    ) -> None:
        """The subscription the payment was for becomes active (the saga completes). A
        payment billing does not know is logged and counted, not retried: no redelivery will
        make it known. Too late (the saga compensates or compensated): nothing appended,
        counted with the status as the reason; billing's ``subscription.cancelled`` tells
        identity to take the plan back."""
        activation = event.data
        subscription_id = await billing.find(uow.session, "payment", activation.payment_id)
        if subscription_id is None:
            log.warning("subscription.activated for unknown payment %s", activation.payment_id)
            metrics.unmatched.labels("subscription.activated", "unknown_payment").inc()
            return
        subscription = await billing.load(uow.session, subscription_id)
        decided = subscription.confirm_activation(
            activation_id=activation.subscription_id, event_id=event.id, at=activation.activated_at
        )
        if not decided and subscription.status != "active":
            log.warning(
                "subscription.activated for subscription %s, which is %s",
                subscription_id,
                subscription.status,
            )
            metrics.unmatched.labels(
                "subscription.activated", f"status_{subscription.status}"
            ).inc()
        for stored in await billing.save(uow, subscription, decided, cause=event.id):
            metrics.appended.labels(stored.type).inc()

    async def on_user_erased(event: Event[UserErasedV1], uow: UnitOfWork) -> None:
        """Delete the user's data key: the user id sealed in their subscriptions' events is
        unreadable from the commit on (the events themselves stay: amounts and plans are
        accounting records). Their rows in the subscriptions read model keep their figures
        and lose the user id; the outbox and the DLQs are purged of them; later requests
        for them are refused. Runs again harmlessly on a replay."""
        user_id = event.data.user_id
        erased = await uow.erase_person(user_id)
        keys = await crypto.shred(uow.session, user_id)
        table = await billing.projector.table_of(uow.session, "subscriptions")
        rows = await uow.session.exec(
            update(table).where(table.c.user_id == user_id).values(user_id=None)
        )
        await remember_erased(uow.session, user_id)
        log.info(
            "user %s erased: %d data key(s), %d read-model row(s), %d outbox row(s), "
            "%d dead letter(s)",
            user_id,
            keys,
            rows.rowcount or 0,
            erased.outbox,
            erased.dead_letters.removed,
        )

    return {
        SubscriptionActivatedV1: on_subscription_activated,
        SubscriptionActivationRejectedV1: saga.on_activation_rejected,
        UserErasedV1: on_user_erased,
    }


def command_handlers(saga: SagaHandlers) -> Handlers:
    return {BillingSagaV1: saga.on_step}
