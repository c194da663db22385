"""The provider's own state: checkouts, payments, refunds and the webhook messages it sends.

Table names carry ``provider_``: in a test process every app's tables share one metadata.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, Column, Text
from sqlmodel import Field, SQLModel

from tributary.messaging.db import UtcDateTime, now

CheckoutStatus = Literal["open", "processing", "paid", "declined", "expired"]
PaymentStatus = Literal["succeeded", "partially_refunded", "refunded"]
WebhookType = Literal["payment.succeeded", "payment.failed", "payment.refunded"]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _ts(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(
        default=None if nullable else ...,
        sa_column=Column(UtcDateTime(), nullable=nullable, index=index),
    )


class Checkout(SQLModel, table=True):
    __tablename__ = "provider_checkouts"

    id: str = Field(primary_key=True, max_length=40)
    amount_cents: int
    currency: str = Field(max_length=3)
    reference: str = Field(max_length=100, index=True)
    metadata_: dict[str, str] = Field(
        default_factory=dict, sa_column=Column("metadata", JSON, nullable=False)
    )
    status: str = Field(max_length=20)
    idempotency_key: str | None = Field(default=None, max_length=200, unique=True)
    request_hash: str = Field(max_length=64)
    payment_id: str | None = Field(default=None, max_length=40)
    decline_reason: str | None = Field(default=None, max_length=200)
    settle_at: datetime | None = _ts(nullable=True, index=True)
    """When a ``delay`` payment succeeds (status ``processing``)."""
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
    updated_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class Payment(SQLModel, table=True):
    __tablename__ = "provider_payments"

    id: str = Field(primary_key=True, max_length=40)
    checkout_id: str = Field(max_length=40, unique=True)
    amount_cents: int
    refunded_cents: int = 0
    currency: str = Field(max_length=3)
    status: str = Field(max_length=20)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class Refund(SQLModel, table=True):
    __tablename__ = "provider_refunds"

    id: str = Field(primary_key=True, max_length=40)
    payment_id: str = Field(max_length=40, index=True)
    amount_cents: int
    reason: str | None = Field(default=None, max_length=200)
    idempotency_key: str | None = Field(default=None, max_length=200, unique=True)
    request_hash: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class WebhookMessage(SQLModel, table=True):
    """One webhook to send, with its delivery state: the durable retry queue.

    ``id`` is the ``webhook-id`` header and the provider's event id: every attempt of a
    message carries the same one (receivers deduplicate on it); the timestamp and signature
    are made anew for each attempt."""

    __tablename__ = "provider_webhook_messages"

    id: str = Field(primary_key=True, max_length=40)
    type: str = Field(max_length=40)
    body: str = Field(sa_column=Column(Text, nullable=False))
    """The exact JSON sent (and signed)."""
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
    next_attempt_at: datetime | None = _ts(nullable=True, index=True)
    """Due from then; None once delivered or given up. An attempt under way moves it past
    its timeout (a lease: a crashed sender's message comes due again)."""
    attempts: int = 0
    delivered_at: datetime | None = _ts(nullable=True)
    failed_at: datetime | None = _ts(nullable=True)
    """Given up after the last retry."""
    last_status: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
