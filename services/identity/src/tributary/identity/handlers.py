"""What identity consumes from billing: ``payment.succeeded`` (activate the paid plan, or
reject the activation) and ``subscription.cancelled`` (take the plan back).

A payment activates one subscription, whose id derives from the payment id, so a payment
announced again finds it. Identity rejects the activation for good, with
``subscription.activation_rejected`` (billing then refunds the payment and cancels its
subscription), when the user is unknown (never existed, or erased) or already has an active
subscription to the same plan (a duplicate purchase).

``subscription.cancelled`` for a payment identity activated cancels that subscription and puts
the user back on the plan of their newest other active subscription, or ``free``. For a
payment identity has not activated (billing gave up waiting: the activation timeout), it
stores a cancelled tombstone under the same id, so the payment's late ``payment.succeeded``
activates nothing; whichever of the two arrives first, the other finds its row. Both lock
the user's row first (PostgreSQL), so they never interleave for one user.
"""

from __future__ import annotations

import logging
from typing import Literal

from sqlmodel import col, select

from tributary.contracts.envelope import Event
from tributary.contracts.events import (
    PaymentSucceededV1,
    SubscriptionActivatedV1,
    SubscriptionActivationRejectedV1,
    SubscriptionCancelledV1,
)
from tributary.identity.models import Subscription, User
from tributary.messaging.bus import Handlers
from tributary.messaging.db import now
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.identity.handlers")


async def _locked_user(uow: UnitOfWork, user_id: str) -> User | None:
    return (
        await uow.session.exec(select(User).where(col(User.id) == user_id).with_for_update())
    ).first()


def _reject(
    uow: UnitOfWork,
    payment: PaymentSucceededV1,
    reason: Literal["unknown_user", "already_subscribed"],
) -> None:
    uow.outbox.add(
        SubscriptionActivationRejectedV1(
            payment_id=payment.payment_id,
            user_id=payment.user_id,
            plan=payment.plan,
            reason=reason,
            rejected_at=now(),
        ),
        subject=f"users/{payment.user_id}",
        idempotency_key=f"subscription.activation_rejected:{payment.payment_id}",
    )
    log.warning(
        "payment %s for user %s not activated: %s", payment.payment_id, payment.user_id, reason
    )


async def on_payment_succeeded(event: Event[PaymentSucceededV1], uow: UnitOfWork) -> None:
    payment = event.data
    subscription_id = Subscription.id_for_payment(payment.payment_id)
    user = await _locked_user(uow, payment.user_id)
    found = await uow.session.get(Subscription, subscription_id)
    if found is not None:
        if found.activated_at is None:  # billing cancelled it before it reached us
            log.info("payment %s was cancelled before activation: nothing", payment.payment_id)
        return  # already activated (e.g. the same payment announced under another event id)
    if user is None:
        _reject(uow, payment, "unknown_user")
        return
    active = (
        await uow.session.exec(
            select(Subscription.id).where(
                col(Subscription.user_id) == user.id,
                col(Subscription.plan) == payment.plan,
                col(Subscription.status) == "active",
            )
        )
    ).first()
    if active is not None:  # a duplicate purchase: billing refunds it
        _reject(uow, payment, "already_subscribed")
        return
    activated_at = now()
    user.plan = payment.plan
    user.updated_at = activated_at
    uow.session.add(user)
    uow.session.add(
        Subscription(
            id=subscription_id,
            user_id=user.id,
            plan=payment.plan,
            payment_id=payment.payment_id,
            activated_at=activated_at,
        )
    )
    uow.outbox.add(
        SubscriptionActivatedV1(
            subscription_id=subscription_id,
            user_id=user.id,
            plan=payment.plan,
            payment_id=payment.payment_id,
            activated_at=activated_at,
        ),
        subject=f"users/{user.id}",
        idempotency_key=f"subscription.activated:{subscription_id}",
    )
    log.info("user %s is now on %s (subscription %s)", user.id, payment.plan, subscription_id)


async def on_subscription_cancelled(event: Event[SubscriptionCancelledV1], uow: UnitOfWork) -> None:
    cancelled = event.data
    if cancelled.payment_id is None:
        return  # cancelled before any payment: identity activated nothing
    subscription_id = Subscription.id_for_payment(cancelled.payment_id)
    user = await _locked_user(uow, cancelled.user_id)
    found = await uow.session.get(Subscription, subscription_id)
    stamp = now()
    if found is None:
        if user is None:  # unknown or erased: nothing could be activated for them anyway
            return
        uow.session.add(
            Subscription(
                id=subscription_id,
                user_id=user.id,
                plan=cancelled.plan,
                payment_id=cancelled.payment_id,
                status="cancelled",
                cancelled_at=stamp,
            )
        )
        log.info(
            "payment %s cancelled (%s) before activation: a tombstone blocks it",
            cancelled.payment_id,
            cancelled.reason,
        )
        return
    if found.status == "cancelled":
        return  # again
    found.status = "cancelled"
    found.cancelled_at = stamp
    uow.session.add(found)
    if user is not None:
        await uow.session.flush()
        others = await uow.session.exec(
            select(Subscription.plan)
            .where(
                col(Subscription.user_id) == user.id,
                col(Subscription.status) == "active",
            )
            .order_by(col(Subscription.activated_at).desc())
        )
        user.plan = others.first() or "free"
        user.updated_at = stamp
        uow.session.add(user)
    log.info(
        "subscription %s cancelled (%s): user %s is on %s",
        subscription_id,
        cancelled.reason,
        found.user_id,
        user.plan if user is not None else "-",
    )


HANDLERS: Handlers = {
    PaymentSucceededV1: on_payment_succeeded,
    SubscriptionCancelledV1: on_subscription_cancelled,
}
