"""The subscription aggregate: its state folded from its events, and its decisions.

``Subscription`` is rebuilt from the stream (``apply`` each event in order); a command asks
it to ``decide`` and gets the new events to append (none when the command changes nothing:
every decision is idempotent). The decisions never touch a database or a clock of their
own: they are plain functions of the state and the command, which a property test drives
with random sequences. The subscription's saga (``saga``, see :mod:`tributary.billing.saga`)
is folded from the same events.

States, and the events that move them:

================  ==============================================  =========================
from              event                                           to
================  ==============================================  =========================
(none)            SubscriptionRequested                           requested
requested         CheckoutCreated / CheckoutFailed                pending_payment / checkout_failed
pending_payment   PaymentSucceeded (with ActivationTimeout-       paid / payment_failed
                  Scheduled) / PaymentFailed
paid              ActivationConfirmed                             active
paid              CompensationStarted (the activation timeout     compensating
                  passed; or ActivationRejected before it)
paid, active      Refunded (full; with Cancelled "refunded")      refunded
compensating      Refunded (full; with Cancelled "activation_...  refunded
                  timeout" / "activation_rejected")
requested, pending_payment, checkout_failed, payment_failed
                  Cancelled (by the user)                         cancelled
cancelled         PaymentSucceeded (late: paid after cancelling)  refund_due
refund_due        CompensationStarted ("late_payment")            compensating
refund_due        Refunded (full)                                 refunded
================  ==============================================  =========================

A partial refund leaves the state as it is. ``ActivationTimeoutScheduled`` and
``ActivationRejected`` leave it as it is too (the first sets the saga's deadline).
``Cancelled`` is appended at most once per subscription: a compensated late payment, whose
subscription was cancelled before, ends without another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, get_args

from tributary.billing.events import (
    ActivationConfirmed,
    ActivationRejected,
    ActivationTimeoutScheduled,
    Cancelled,
    CancelReason,
    CheckoutCreated,
    CheckoutFailed,
    CompensationStarted,
    DomainEvent,
    PaymentFailed,
    PaymentSucceeded,
    Refunded,
    RejectionReason,
    SubscriptionRequested,
)
from tributary.billing.plans import Plan
from tributary.billing.saga import SagaFold, advance, cancel_reason_for

Status = Literal[
    "requested",
    "pending_payment",
    "checkout_failed",
    "paid",
    "active",
    "payment_failed",
    "cancelled",
    "refund_due",
    "compensating",
    "refunded",
]
STATUSES: tuple[Status, ...] = get_args(Status)
AWAITING_PAYMENT: frozenset[Status] = frozenset({"requested", "pending_payment"})
CANCELLABLE: frozenset[Status] = frozenset(
    {"requested", "pending_payment", "checkout_failed", "payment_failed"}
)
PAID: frozenset[Status] = frozenset({"paid", "active", "refund_due", "compensating"})
"""Money taken and not (all) given back."""


class InvalidTransition(Exception):
    """The command makes no sense in the subscription's state (409 over HTTP)."""


@dataclass(frozen=True)
class Step:
    version: int
    type: str
    recorded_at: datetime


@dataclass
class Subscription:
    id: str
    version: int = 0
    status: Status | None = None
    """None: no such subscription (an empty stream)."""
    user_id: str | None = None
    """None for an erased user (their data key is gone) or before the first event."""
    plan: Plan = "starter"
    amount_cents: int = 0
    currency: str = ""
    checkout_id: str | None = None
    pay_url: str | None = None
    payment_id: str | None = None
    provider_payment_id: str | None = None
    paid_cents: int = 0
    refunded_cents: int = 0
    refund_ids: set[str] = field(default_factory=set)
    activation_id: str | None = None
    activation_due_at: datetime | None = None
    """The saga's activation deadline (set with the payment)."""
    compensation_reason: str | None = None
    """Why the saga gives the money back (None: it does not)."""
    cancelled: bool = False
    """A ``Cancelled`` was appended (there is never a second)."""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    history: list[Step] = field(default_factory=list)
    saga: SagaFold = field(default_factory=SagaFold)

    @property
    def exists(self) -> bool:
        return self.status is not None

    # -- evolve ----------------------------------------------------------------------------

    def apply(self, event: DomainEvent, version: int, recorded_at: datetime) -> None:
        """Fold one event into the state (it happened: no check can refuse it)."""
        if isinstance(event, SubscriptionRequested):
            self.status = "requested"
            self.plan = event.plan
            self.amount_cents = event.amount_cents
            self.currency = event.currency
            self.created_at = event.requested_at
        elif isinstance(event, CheckoutCreated):
            self.status = "pending_payment"
            self.checkout_id = event.checkout_id
            self.pay_url = event.pay_url
        elif isinstance(event, CheckoutFailed):
            self.status = "checkout_failed"
        elif isinstance(event, PaymentSucceeded):
            self.status = "refund_due" if event.late else "paid"
            self.payment_id = event.payment_id
            self.provider_payment_id = event.provider_payment_id
            self.paid_cents = event.amount_cents
        elif isinstance(event, PaymentFailed):
            self.status = "payment_failed"
            self.payment_id = event.payment_id
        elif isinstance(event, Refunded):
            self.refund_ids.add(event.refund_id)
            self.refunded_cents += event.amount_cents
            if event.full:
                self.status = "refunded"
        elif isinstance(event, ActivationConfirmed):
            self.status = "active"
            self.activation_id = event.activation_id
        elif isinstance(event, ActivationTimeoutScheduled):
            self.activation_due_at = event.due_at
        elif isinstance(event, CompensationStarted):
            self.status = "compensating"
            self.compensation_reason = event.reason
        elif isinstance(event, Cancelled):
            self.cancelled = True
            if self.status != "refunded":
                self.status = "cancelled"
        self.saga = advance(self.saga, event)
        self.version = version
        self.updated_at = recorded_at
        self.history.append(Step(version, event.name, recorded_at))

    # -- decide ----------------------------------------------------------------------------

    def request(
        self, *, user: object, plan: Plan, amount_cents: int, currency: str, at: datetime
    ) -> list[DomainEvent]:
        if self.exists:
            raise InvalidTransition(f"subscription {self.id} exists already")
        return [
            SubscriptionRequested.model_validate(
                {
                    "user": user,
                    "plan": plan,
                    "amount_cents": amount_cents,
                    "currency": currency,
                    "requested_at": at,
                }
            )
        ]

    def record_checkout(self, checkout_id: str, pay_url: str, at: datetime) -> list[DomainEvent]:
        if self.checkout_id == checkout_id:
            return []
        if self.status != "requested":
            raise InvalidTransition(f"subscription {self.id} is {self.status}: no checkout now")
        return [CheckoutCreated(checkout_id=checkout_id, pay_url=pay_url, created_at=at)]

    def checkout_failed(self, reason: str, at: datetime) -> list[DomainEvent]:
        if self.status != "requested":
            return []
        return [CheckoutFailed(reason=reason[:200], failed_at=at)]

    def payment_succeeded(
        self,
        *,
        payment_id: str,
        provider_payment_id: str,
        provider_event_id: str,
        paid_at: datetime,
        activation_due_at: datetime | None = None,
    ) -> list[DomainEvent]:
        """Record the payment and set the saga's activation deadline (``activation_due_at``;
        None: identity may take as long as it takes); a payment after cancelling (late)
        starts compensating at once instead."""
        if self.payment_id == payment_id and self.status in PAID | {"refunded"}:
            return []  # this payment is recorded already (another event id announced it)
        if self.status in PAID | {"refunded"}:
            raise InvalidTransition(f"subscription {self.id} is paid by {self.payment_id}")
        late = self.status not in AWAITING_PAYMENT | {"payment_failed"}
        paid = PaymentSucceeded(
            payment_id=payment_id,
            provider_payment_id=provider_payment_id,
            provider_event_id=provider_event_id,
            amount_cents=self.amount_cents,
            currency=self.currency,
            plan=self.plan,
            late=late,
            paid_at=paid_at,
        )
        if late:
            return [paid, CompensationStarted(reason="late_payment", started_at=paid_at)]
        if activation_due_at is None:
            return [paid]
        return [paid, ActivationTimeoutScheduled(due_at=activation_due_at)]

    def payment_failed(
        self, *, payment_id: str, provider_event_id: str, reason: str, at: datetime
    ) -> list[DomainEvent]:
        if self.status not in AWAITING_PAYMENT:
            return []  # paid, failed or ended already: a late or repeated failure changes nothing
        return [
            PaymentFailed(
                payment_id=payment_id,
                provider_event_id=provider_event_id,
                amount_cents=self.amount_cents,
                currency=self.currency,
                reason=reason[:500],
                failed_at=at,
            )
        ]

    def refunded(
        self,
        *,
        refund_id: str,
        provider_event_id: str,
        amount_cents: int,
        reason: str | None,
        at: datetime,
    ) -> list[DomainEvent]:
        """Record a refund (the provider's webhook, or the saga's own refund step: whichever
        comes first; the other finds the refund id recorded). Refunded in full, the
        subscription ends (``Cancelled``) unless it had ended before."""
        if refund_id in self.refund_ids:
            return []
        if self.status not in PAID or self.payment_id is None:
            raise InvalidTransition(f"subscription {self.id} is {self.status}: nothing to refund")
        if self.refunded_cents + amount_cents > self.paid_cents:
            raise InvalidTransition(f"a refund of {amount_cents} exceeds the payment")
        full = self.refunded_cents + amount_cents == self.paid_cents
        events: list[DomainEvent] = [
            Refunded(
                payment_id=self.payment_id,
                refund_id=refund_id,
                provider_event_id=provider_event_id,
                amount_cents=amount_cents,
                currency=self.currency,
                plan=self.plan,
                full=full,
                reason=reason[:500] if reason else None,
                refunded_at=at,
            )
        ]
        if full and not self.cancelled:  # a late payment's subscription was cancelled before
            why: CancelReason = "refunded"
            if self.status == "compensating" and self.compensation_reason is not None:
                why = cancel_reason_for(self.compensation_reason)
            events.append(Cancelled(reason=why, payment_id=self.payment_id, cancelled_at=at))
        return events

    def confirm_activation(
        self, *, activation_id: str, event_id: str, at: datetime
    ) -> list[DomainEvent]:
        if self.status == "active" or self.status != "paid":
            return []  # again, or too late (refunded, cancelled): the saga compensates later
        return [
            ActivationConfirmed(activation_id=activation_id, event_id=event_id, activated_at=at)
        ]

    def activation_timed_out(self, at: datetime) -> list[DomainEvent]:
        """The saga's activation timeout: still only paid, so identity did not activate the
        plan in time; compensate. Anything else (active, compensating, ended): nothing."""
        if self.status != "paid":
            return []
        return [CompensationStarted(reason="activation_timeout", started_at=at)]

    def activation_rejected(
        self, *, reason: RejectionReason, event_id: str, at: datetime
    ) -> list[DomainEvent]:
        """Identity will not activate the plan: compensate, if the subscription is still only
        paid (a rejection after a timeout, or again, changes nothing)."""
        if self.status != "paid":
            return []
        return [
            ActivationRejected(reason=reason, event_id=event_id, rejected_at=at),
            CompensationStarted(reason=f"activation_rejected:{reason}", started_at=at),
        ]

    def cancel(self, at: datetime) -> list[DomainEvent]:
        if self.status == "cancelled":
            return []
        if self.status not in CANCELLABLE:
            raise InvalidTransition(
                f"subscription {self.id} is {self.status}: it cannot be cancelled"
            )
        return [Cancelled(reason="cancelled_by_user", cancelled_at=at)]
