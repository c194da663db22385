"""The provider's HTTP API: what a merchant calls with its API key, and the payer's pay action."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.payment_provider import ledger
from tributary.payment_provider.auth import API_KEY
from tributary.payment_provider.models import WebhookMessage
from tributary.payment_provider.schemas import (
    CheckoutCreate,
    CheckoutPublic,
    IdempotencyKey,
    Pay,
    PaymentPublic,
    RefundCreate,
    RefundPublic,
    WebhookMessagePublic,
)
from tributary.payment_provider.webhooks import Sender

merchant = APIRouter(tags=["merchant"], dependencies=[API_KEY])
payer = APIRouter(tags=["payer"])

CheckoutId = Annotated[str, Path(max_length=40)]
PaymentId = Annotated[str, Path(max_length=40)]
KeyHeader = Annotated[IdempotencyKey | None, Header(alias="Idempotency-Key")]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def _public_url(request: Request) -> str:
    url: str = request.app.state.settings.public_url
    return url


def _sender(request: Request) -> Sender:
    sender: Sender = request.app.state.sender
    return sender


@merchant.post("/checkouts", status_code=201)
async def create_checkout(
    request: Request,
    response: Response,
    session: SessionDep,
    body: CheckoutCreate,
    idempotency_key: KeyHeader = None,
) -> CheckoutPublic:
    """A checkout for ``amount_cents`` in ``currency``; the payer pays it at ``pay_url``.

    The same `Idempotency-Key` with the same body answers the checkout made the first time
    (header `Idempotent-Replayed: true`); with another body, 409.
    """
    checkout, replayed = await ledger.create_checkout(session, body, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return CheckoutPublic.of(checkout, _public_url(request))


@merchant.get("/checkouts/{checkout_id}")
async def get_checkout(
    request: Request, session: SessionDep, checkout_id: CheckoutId
) -> CheckoutPublic:
    return CheckoutPublic.of(await ledger.checkout_of(session, checkout_id), _public_url(request))


@merchant.post("/checkouts/{checkout_id}/expire")
async def expire_checkout(
    request: Request, session: SessionDep, checkout_id: CheckoutId
) -> CheckoutPublic:
    """Close an open checkout: it can no longer be paid. Declined or expired already: as it
    is. Paid, or a delayed payment under way: 409."""
    return CheckoutPublic.of(await ledger.expire(session, checkout_id), _public_url(request))


@payer.post("/checkouts/{checkout_id}/pay")
async def pay(
    request: Request, session: SessionDep, checkout_id: CheckoutId, body: Pay
) -> CheckoutPublic:
    """Pay an open checkout, as the payer at the pay URL (the checkout id is the credential):
    `succeed`, `decline` (with `decline_reason`), or `delay` (succeeds after `delay_seconds`).
    Not open any more: 409."""
    await ledger.pay(session, checkout_id, body, request.app.state.settings.default_delay_seconds)
    _sender(request).wake()
    return CheckoutPublic.of(await ledger.checkout_of(session, checkout_id), _public_url(request))


@merchant.get("/payments/{payment_id}")
async def get_payment(session: SessionDep, payment_id: PaymentId) -> PaymentPublic:
    return PaymentPublic.of(await ledger.payment_of(session, payment_id))


@merchant.post("/payments/{payment_id}/refunds", status_code=201)
async def refund(
    request: Request,
    response: Response,
    session: SessionDep,
    payment_id: PaymentId,
    body: RefundCreate,
    idempotency_key: KeyHeader = None,
) -> RefundPublic:
    """Refund `amount_cents` of a payment (default: all that is left); a `payment.refunded`
    webhook follows. More than is left: 409. `Idempotency-Key` as for checkouts."""
    record, payment, replayed = await ledger.refund(session, payment_id, body, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        _sender(request).wake()
    return RefundPublic.of(record, payment.currency)


@merchant.get("/webhook-messages")
async def webhook_messages(
    session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[WebhookMessagePublic]:
    """The webhooks sent or to send, newest first, with their delivery state."""
    rows = await session.exec(
        select(WebhookMessage).order_by(col(WebhookMessage.created_at).desc()).limit(limit)
    )
    return [WebhookMessagePublic.of(m) for m in rows.all()]
