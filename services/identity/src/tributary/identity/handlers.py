from __future__ import annotations

import logging

from sqlmodel import col, select

from tributary.contracts.envelope import Event
from tributary.contracts.events import PaymentSucceededV1, SubscriptionActivatedV1
from tributary.identity.models import Subscription, User
from tributary.messaging.bus import Handlers
from tributary.messaging.db import now
from tributary.messaging.errors import PermanentError
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.identity.handlers")


async def on_payment_succeeded(event: Event[PaymentSucceededV1], uow: UnitOfWork) -> None:
    payment = event.data
    subscription_id = Subscription.id_for_payment(payment.payment_id)
    if await uow.session.get(Subscription, subscription_id) is not None:
        return  # already activated (e.g. the same payment announced under another event id)
    user = (
        await uow.session.exec(
            select(User).where(col(User.id) == payment.user_id).with_for_update()
        )
    ).first()
    if user is None:
        raise PermanentError(f"payment {payment.payment_id} is for unknown user {payment.user_id}")
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


HANDLERS: Handlers = {PaymentSucceededV1: on_payment_succeeded}
