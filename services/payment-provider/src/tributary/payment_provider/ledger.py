"""What the provider does: checkouts, payments (at once, declined or delayed), refunds.

Each change and its webhook commit together. State changes are conditional updates (``WHERE
status = 'open'``), so two payers, or a payer and the merchant expiring the checkout, never
both win; refunds never exceed the payment, however many arrive at once.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import case, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.messaging.db import now
from tributary.payment_provider import webhooks
from tributary.payment_provider.models import Checkout, Payment, Refund, new_id
from tributary.payment_provider.schemas import CheckoutCreate, Pay, RefundCreate
from tributary.service.problems import Problem, conflict, not_found


def request_hash(body: BaseModel) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay_of(found: Any, digest: str) -> Any:
    if found.request_hash != digest:
        raise conflict(
            "This Idempotency-Key was used with another request.",
            field="header.Idempotency-Key",
            message="was used with another request",
        )
    return found


async def create_checkout(
    session: AsyncSession, body: CheckoutCreate, idempotency_key: str | None
) -> tuple[Checkout, bool]:
    """The new checkout (committed), or the one made earlier with the same key (True)."""
    digest = request_hash(body)
    if idempotency_key is not None:
        found = (
            await session.exec(
                select(Checkout).where(col(Checkout.idempotency_key) == idempotency_key)
            )
        ).first()
        if found is not None:
            return _replay_of(found, digest), True
    checkout = Checkout(
        id=new_id("chk"),
        amount_cents=body.amount_cents,
        currency=body.currency,
        reference=body.reference,
        metadata_=dict(body.metadata),
        status="open",
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    session.add(checkout)
    try:
        await session.commit()
    except IntegrityError:  # the same key, committed by a request running alongside
        await session.rollback()
        found = (
            await session.exec(
                select(Checkout).where(col(Checkout.idempotency_key) == idempotency_key)
            )
        ).one()
        return _replay_of(found, digest), True
    return checkout, False


async def checkout_of(session: AsyncSession, checkout_id: str) -> Checkout:
    checkout = await session.get(Checkout, checkout_id)
    if checkout is None:
        raise not_found(f"There is no checkout {checkout_id}.", field="path.checkout_id")
    return checkout


async def _move(session: AsyncSession, checkout_id: str, old: str, **values: Any) -> bool:
    result = await session.exec(
        update(Checkout)
        .where(col(Checkout.id) == checkout_id)
        .where(col(Checkout.status) == old)
        .values(updated_at=now(), **values)
    )
    return bool(result.rowcount)


async def _succeed(session: AsyncSession, checkout: Checkout) -> None:
    """Record the payment of a checkout just moved to ``paid``, and its webhook."""
    payment = Payment(
        id=new_id("pi"),
        checkout_id=checkout.id,
        amount_cents=checkout.amount_cents,
        currency=checkout.currency,
        status="succeeded",
    )
    session.add(payment)
    await session.exec(
        update(Checkout).where(col(Checkout.id) == checkout.id).values(payment_id=payment.id)
    )
    webhooks.succeeded(session, checkout, payment)


async def pay(session: AsyncSession, checkout_id: str, body: Pay, delay_default: float) -> None:
    """The payer's action on an open checkout (committed); 409 when it is not open."""
    checkout = await checkout_of(session, checkout_id)
    if body.outcome == "succeed":
        moved = await _move(session, checkout_id, "open", status="paid")
        if moved:
            await _succeed(session, checkout)
    elif body.outcome == "decline":
        moved = await _move(
            session, checkout_id, "open", status="declined", decline_reason=body.decline_reason
        )
        if moved:
            webhooks.failed(session, checkout, body.decline_reason)
    else:
        delay = body.delay_seconds if body.delay_seconds is not None else delay_default
        settle_at = now() + timedelta(seconds=delay)
        moved = await _move(session, checkout_id, "open", status="processing", settle_at=settle_at)
    if not moved:
        await session.rollback()
        current = await checkout_of(session, checkout_id)
        raise conflict(f"The checkout is {current.status}: it cannot be paid now.")
    await session.commit()


async def settle_due(session: AsyncSession) -> int:
    """Let every delayed payment whose time has come succeed; how many did."""
    rows = await session.exec(
        select(Checkout)
        .where(col(Checkout.status) == "processing")
        .where(col(Checkout.settle_at) <= now())
        .limit(100)
    )
    settled = 0
    for checkout in list(rows.all()):
        if await _move(session, checkout.id, "processing", status="paid", settle_at=None):
            await _succeed(session, checkout)
            await session.commit()
            settled += 1
        else:
            await session.rollback()
    return settled


async def expire(session: AsyncSession, checkout_id: str) -> Checkout:
    """Close an open checkout so it can no longer be paid (committed). A declined or expired
    one is left as it is; a paid or processing one cannot be expired (409)."""
    await checkout_of(session, checkout_id)
    if await _move(session, checkout_id, "open", status="expired"):
        await session.commit()
    checkout = await checkout_of(session, checkout_id)
    await session.refresh(checkout)
    if checkout.status in ("paid", "processing"):
        raise conflict(f"The checkout is {checkout.status}: it cannot be expired.")
    return checkout


async def payment_of(session: AsyncSession, payment_id: str) -> Payment:
    payment = await session.get(Payment, payment_id)
    if payment is None:
        raise not_found(f"There is no payment {payment_id}.", field="path.payment_id")
    return payment


async def refund(
    session: AsyncSession, payment_id: str, body: RefundCreate, idempotency_key: str | None
) -> tuple[Refund, Payment, bool]:
    """Refund (part of) a payment (committed), or the refund made earlier with the same key."""
    digest = request_hash(body)
    payment = await payment_of(session, payment_id)
    if idempotency_key is not None:
        found = (
            await session.exec(select(Refund).where(col(Refund.idempotency_key) == idempotency_key))
        ).first()
        if found is not None:
            return _replay_of(found, digest), payment, True
    amount = body.amount_cents or payment.amount_cents - payment.refunded_cents
    if amount <= 0:
        raise conflict(f"The payment {payment_id} is refunded in full already.")
    total = col(Payment.refunded_cents) + amount
    moved = await session.exec(
        update(Payment)
        .where(col(Payment.id) == payment_id)
        .where(total <= col(Payment.amount_cents))
        .values(
            refunded_cents=total,
            status=case(
                (total >= col(Payment.amount_cents), "refunded"), else_="partially_refunded"
            ),
        )
    )
    if not moved.rowcount:
        await session.rollback()
        raise Problem(
            409, f"A refund of {amount} would exceed what is left of the payment {payment_id}."
        )
    record = Refund(
        id=new_id("re"),
        payment_id=payment_id,
        amount_cents=amount,
        reason=body.reason,
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    session.add(record)
    await session.flush()
    await session.refresh(payment)
    checkout = await checkout_of(session, payment.checkout_id)
    webhooks.stage(
        session,
        "payment.refunded",
        {
            **webhooks.checkout_data(checkout),
            "payment_id": payment_id,
            "refund_id": record.id,
            "amount_cents": amount,
            "refunded_cents": payment.refunded_cents,
            "full": payment.refunded_cents >= payment.amount_cents,
            "reason": body.reason,
            "refunded_at": webhooks.iso(record.created_at),
        },
    )
    try:
        await session.commit()
    except IntegrityError:  # the same key, committed by a request running alongside
        await session.rollback()
        found = (
            await session.exec(select(Refund).where(col(Refund.idempotency_key) == idempotency_key))
        ).one()
        return _replay_of(found, digest), await payment_of(session, payment_id), True
    return record, payment, False
