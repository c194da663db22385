"""The subscription's domain events: what happened to it, in billing's own words.

These are stored, not published: they may change shape (a new ``schema_version`` with an
upcaster) without a contract review. What other services see are the integration events
billing derives from them (``payment.succeeded`` …, see ``subscriptions.integration``).

Personal data: the only one is the user id, kept in ``SubscriptionRequested.user`` encrypted
with the user's data key (``crypto``); the other events name the subscription, never the user.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from tributary.billing.plans import Plan

CancelReason = Literal["cancelled_by_user", "refunded", "activation_rejected", "activation_timeout"]
RejectionReason = Literal["unknown_user", "already_subscribed"]
Cents = Annotated[int, Field(ge=1)]


class Sealed(BaseModel):
    """A value encrypted with a user's data key (AES-256-GCM): the key's id, and base64 of
    the nonce and the ciphertext. Unreadable for good once the key is deleted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str
    ciphertext: str


class DomainEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str]
    schema_version: ClassVar[int] = 1


class SubscriptionRequested(DomainEvent):
    name: ClassVar[str] = "SubscriptionRequested"
    schema_version: ClassVar[int] = 2

    user: Sealed
    plan: Plan
    amount_cents: Cents
    currency: str
    requested_at: AwareDatetime


class CheckoutCreated(DomainEvent):
    name: ClassVar[str] = "CheckoutCreated"

    checkout_id: str
    pay_url: str
    created_at: AwareDatetime


class CheckoutFailed(DomainEvent):
    name: ClassVar[str] = "CheckoutFailed"

    reason: Annotated[str, Field(max_length=200)]
    failed_at: AwareDatetime


class PaymentSucceeded(DomainEvent):
    name: ClassVar[str] = "PaymentSucceeded"

    payment_id: str
    provider_payment_id: str
    provider_event_id: str
    amount_cents: Cents
    currency: str
    plan: Plan
    late: bool = False
    """Paid after the subscription was cancelled: money to give back, nothing to activate."""
    paid_at: AwareDatetime


class PaymentFailed(DomainEvent):
    name: ClassVar[str] = "PaymentFailed"

    payment_id: str
    provider_event_id: str
    amount_cents: Cents
    currency: str
    reason: Annotated[str, Field(max_length=500)]
    failed_at: AwareDatetime


class Refunded(DomainEvent):
    name: ClassVar[str] = "Refunded"

    payment_id: str
    refund_id: str
    provider_event_id: str
    amount_cents: Cents
    currency: str
    plan: Plan
    full: bool
    reason: Annotated[str, Field(max_length=500)] | None = None
    refunded_at: AwareDatetime


class ActivationConfirmed(DomainEvent):
    name: ClassVar[str] = "ActivationConfirmed"

    activation_id: str
    """Identity's id of the activated plan (``subscription.activated``'s subscription_id)."""
    event_id: str
    activated_at: AwareDatetime


class ActivationTimeoutScheduled(DomainEvent):
    """The saga's deadline for identity to activate the plan (a scheduled ``billing.saga``
    command staged with it checks at ``due_at``)."""

    name: ClassVar[str] = "ActivationTimeoutScheduled"

    due_at: AwareDatetime


class ActivationRejected(DomainEvent):
    """Identity will not activate the plan (``subscription.activation_rejected``)."""

    name: ClassVar[str] = "ActivationRejected"

    reason: RejectionReason
    event_id: str
    rejected_at: AwareDatetime


class CompensationStarted(DomainEvent):
    """The saga gives the money back: a ``refund`` step is staged with it. ``reason`` says
    why: ``activation_timeout``, ``activation_rejected:<identity's reason>`` or
    ``late_payment`` (paid after the subscription was cancelled)."""

    name: ClassVar[str] = "CompensationStarted"

    reason: Annotated[str, Field(min_length=1, max_length=100)]
    started_at: AwareDatetime


class Cancelled(DomainEvent):
    name: ClassVar[str] = "Cancelled"

    reason: CancelReason
    payment_id: str | None = None
    cancelled_at: AwareDatetime


EVENT_TYPES: dict[str, type[DomainEvent]] = {
    model.name: model
    for model in (
        SubscriptionRequested,
        CheckoutCreated,
        CheckoutFailed,
        PaymentSucceeded,
        PaymentFailed,
        Refunded,
        ActivationConfirmed,
        ActivationTimeoutScheduled,
        ActivationRejected,
        CompensationStarted,
        Cancelled,
    )
}
CURRENT_VERSIONS: dict[str, int] = {name: m.schema_version for name, m in EVENT_TYPES.items()}


def parse(type_name: str, data: dict[str, Any]) -> DomainEvent:
    """The model of a stored event's data (already upcast to the current version)."""
    return EVENT_TYPES[type_name].model_validate(data)


def dump(event: DomainEvent) -> dict[str, Any]:
    return event.model_dump(mode="json")


def timestamp(value: datetime) -> str:
    return value.isoformat()
