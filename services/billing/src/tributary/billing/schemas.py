"""Request and answer bodies of billing's API."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from tributary.billing.plans import Plan
from tributary.billing.saga import TIMEOUT_STEP, SagaState, SagaStep
from tributary.billing.subscription import Status, Subscription

UserId = Annotated[str, Field(pattern=r"^usr_[A-Za-z0-9]{8,40}$")]
SUBSCRIPTION_ID = re.compile(r"sub_[A-Za-z0-9]{8,40}")


class SubscriptionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: Plan
    user_id: UserId | None = None
    """Default: the caller; another user's needs `users:admin`."""


class StepPublic(BaseModel):
    version: int
    type: str
    recorded_at: datetime


class SubscriptionPublic(BaseModel):
    """A subscription as its event stream says (the write model: always up to date)."""

    id: str
    user_id: str | None
    """None once the user was erased."""
    plan: Plan
    status: Status
    amount_cents: int
    currency: str
    checkout_id: str | None
    pay_url: str | None
    payment_id: str | None
    refunded_cents: int
    version: int
    created_at: datetime | None
    updated_at: datetime | None
    history: list[StepPublic]

    @classmethod
    def of(cls, subscription: Subscription) -> SubscriptionPublic:
        assert subscription.status is not None  # noqa: S101 -- only existing ones are shown
        return cls(
            id=subscription.id,
            user_id=subscription.user_id,
            plan=subscription.plan,
            status=subscription.status,
            amount_cents=subscription.amount_cents,
            currency=subscription.currency,
            checkout_id=subscription.checkout_id,
            pay_url=subscription.pay_url,
            payment_id=subscription.payment_id,
            refunded_cents=subscription.refunded_cents,
            version=subscription.version,
            created_at=subscription.created_at,
            updated_at=subscription.updated_at,
            history=[
                StepPublic(version=s.version, type=s.type, recorded_at=s.recorded_at)
                for s in subscription.history
            ],
        )


class SubscriptionRow(BaseModel):
    """A subscription as the read model has it (``GET /subscriptions``)."""

    id: str
    user_id: str | None
    plan: str
    status: str
    amount_cents: int
    currency: str
    checkout_id: str | None
    payment_id: str | None
    refunded_cents: int
    version: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> SubscriptionRow:
        values = dict(row._mapping)
        values["id"] = values.pop("subscription_id")
        return cls.model_validate(values)


class SubscriptionPage(BaseModel):
    items: list[SubscriptionRow]
    next_cursor: str | None


class RevenueLine(BaseModel):
    plan: str
    currency: str
    payments: int
    gross_cents: int
    refunds: int
    refunded_cents: int
    net_cents: int


class Revenue(BaseModel):
    lines: list[RevenueLine]
    position: int
    """The event-store position the figures include."""


class SagaStepPublic(BaseModel):
    """One event of the saga's stream: what happened, and when it was recorded."""

    version: int
    type: str
    at: datetime


class PendingTimeout(BaseModel):
    step: SagaStep
    due_at: datetime


class SagaPublic(BaseModel):
    """A subscription's saga as its event stream says (always up to date)."""

    id: str
    """The subscription's id (the saga's)."""
    state: SagaState
    status: Status
    """The subscription's status."""
    reason: str | None
    """Why it is in its state (compensation, failure, cancellation or refund), if known."""
    version: int
    steps: list[SagaStepPublic]
    pending_timeout: PendingTimeout | None
    """The activation timeout still to come (``awaiting_activation`` only)."""

    @classmethod
    def of(cls, subscription: Subscription) -> SagaPublic:
        assert subscription.status is not None  # noqa: S101 -- only existing ones are shown
        saga = subscription.saga
        pending = (
            PendingTimeout(step=TIMEOUT_STEP, due_at=saga.pending_timeout_at)
            if saga.pending_timeout_at is not None
            else None
        )
        return cls(
            id=subscription.id,
            state=saga.state,
            status=subscription.status,
            reason=saga.reason,
            version=subscription.version,
            steps=[
                SagaStepPublic(version=s.version, type=s.type, at=s.recorded_at)
                for s in subscription.history
            ],
            pending_timeout=pending,
        )


class SagaRow(BaseModel):
    """A saga as the read model has it (``GET /sagas``)."""

    id: str
    state: SagaState
    reason: str | None
    pending_timeout_at: datetime | None
    version: int
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> SagaRow:
        values = dict(row._mapping)
        values["id"] = values.pop("subscription_id")
        return cls.model_validate(values)


class SagaPage(BaseModel):
    items: list[SagaRow]
    next_cursor: str | None


def make_cursor(created_at: datetime, subscription_id: str) -> str:
    raw = f"{created_at.isoformat()}|{subscription_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_cursor(cursor: str) -> tuple[datetime, str]:
    """ValueError for anything ``make_cursor`` did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("not a cursor") from exc
    stamp, _, subscription_id = raw.partition("|")
    when = datetime.fromisoformat(stamp)
    if when.tzinfo is None or not SUBSCRIPTION_ID.fullmatch(subscription_id):
        raise ValueError("not a cursor")
    return when, subscription_id
