"""What billing consumes: ``subscription.activated`` (identity activated the plan a payment
paid for: the subscription becomes active) and ``user.erased`` (crypto-shredding)."""

from __future__ import annotations

import logging

from sqlalchemy import update

from tributary.billing import crypto
from tributary.billing.commands import Billing
from tributary.billing.metrics import BillingMetrics
from tributary.contracts.envelope import Event
from tributary.contracts.events import SubscriptionActivatedV1, UserErasedV1
from tributary.messaging.bus import Handlers
from tributary.messaging.erasure import remember_erased
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.billing.handlers")


def event_handlers(billing: Billing, metrics: BillingMetrics) -> Handlers:
    async def on_subscription_activated(
        event: Event[SubscriptionActivatedV1], uow: UnitOfWork
    ) -> None:
        """The subscription the payment was for becomes active. A payment billing does not
        know is logged and counted (``tributary_billing_unmatched_messages_total``), not
        retried: no redelivery will make it known. A concurrent append raises the conflict,
        and the runtime delivers the event again."""
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
        UserErasedV1: on_user_erased,
    }
