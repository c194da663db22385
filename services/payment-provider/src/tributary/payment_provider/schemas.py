"""Request and answer bodies of the provider's API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tributary.payment_provider.models import Checkout, Payment, Refund, WebhookMessage

Amount = Annotated[int, Field(ge=1, le=100_000_000)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
Reference = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_:.-]+$")]
MetadataKey = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckoutCreate(Strict):
    amount_cents: Amount
    currency: Currency
    reference: Reference
    """The merchant's own reference (billing: the subscription id); sent back in webhooks."""
    metadata: dict[MetadataKey, Annotated[str, Field(max_length=200)]] = Field(
        default_factory=dict, max_length=20
    )


class CheckoutPublic(BaseModel):
    id: str
    status: Literal["open", "processing", "paid", "declined", "expired"]
    amount_cents: int
    currency: str
    reference: str
    metadata: dict[str, str]
    pay_url: str
    payment_id: str | None
    decline_reason: str | None
    settle_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, checkout: Checkout, public_url: str) -> CheckoutPublic:
        return cls(
            id=checkout.id,
            status=checkout.status,  # type: ignore[arg-type]
            amount_cents=checkout.amount_cents,
            currency=checkout.currency,
            reference=checkout.reference,
            metadata=dict(checkout.metadata_),
            pay_url=f"{public_url.rstrip('/')}/checkouts/{checkout.id}/pay",
            payment_id=checkout.payment_id,
            decline_reason=checkout.decline_reason,
            settle_at=checkout.settle_at,
            created_at=checkout.created_at,
        )


class Pay(Strict):
    outcome: Literal["succeed", "decline", "delay"]
    """``succeed`` and ``decline`` at once; ``delay`` succeeds after ``delay_seconds``."""
    delay_seconds: Annotated[float, Field(ge=0, le=3600)] | None = None
    decline_reason: Annotated[str, Field(min_length=1, max_length=200)] = "card_declined"


class PaymentPublic(BaseModel):
    id: str
    checkout_id: str
    status: Literal["succeeded", "partially_refunded", "refunded"]
    amount_cents: int
    refunded_cents: int
    currency: str
    created_at: datetime

    @classmethod
    def of(cls, payment: Payment) -> PaymentPublic:
        return cls(
            id=payment.id,
            checkout_id=payment.checkout_id,
            status=payment.status,  # type: ignore[arg-type]
            amount_cents=payment.amount_cents,
            refunded_cents=payment.refunded_cents,
            currency=payment.currency,
            created_at=payment.created_at,
        )


class RefundCreate(Strict):
    amount_cents: Amount | None = None
    """Default: whatever is left to refund."""
    reason: Annotated[str, Field(min_length=1, max_length=200)] | None = None


class RefundPublic(BaseModel):
    id: str
    payment_id: str
    amount_cents: int
    currency: str
    reason: str | None
    created_at: datetime

    @classmethod
    def of(cls, refund: Refund, currency: str) -> RefundPublic:
        return cls(
            id=refund.id,
            payment_id=refund.payment_id,
            amount_cents=refund.amount_cents,
            currency=currency,
            reason=refund.reason,
            created_at=refund.created_at,
        )


class WebhookMessagePublic(BaseModel):
    id: str
    type: str
    created_at: datetime
    attempts: int
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    failed_at: datetime | None
    last_status: int | None
    last_error: str | None

    @classmethod
    def of(cls, message: WebhookMessage) -> WebhookMessagePublic:
        return cls.model_validate(message, from_attributes=True)
