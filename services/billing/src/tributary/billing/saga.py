"""The subscription saga: payment → activation by identity → done, or compensation.

The saga is the subscription's own process: its id is the subscription id and its state is
folded from the subscription's event stream (so every step gets the event store's optimistic
concurrency, and a replay of the stream gives the same saga). :func:`advance` is that fold,
one event at a time; the aggregate (``Subscription.saga``) and the ``sagas`` projection both
use it, so ``GET /sagas/{id}`` and ``GET /sagas?state=`` cannot disagree.

States, and the events that move them:

====================  ==============================================  ======================
state                 meaning                                         left by
====================  ==============================================  ======================
awaiting_payment      requested, checkout open                        PaymentSucceeded /
                                                                      PaymentFailed /
                                                                      CheckoutFailed /
                                                                      Cancelled
awaiting_activation   paid; identity has until the activation         ActivationConfirmed /
                      timeout (``pending_timeout``) to activate       CompensationStarted /
                                                                      Refunded (full)
completed             identity activated the plan                     Refunded (full)
compensating          giving the money back (``reason``): the         Refunded (full)
                      ``refund`` step is staged or under way
compensated           refunded in full by the saga and cancelled      (final)
failed                the checkout or the payment failed              Cancelled
cancelled             cancelled by the user (before paying)           PaymentSucceeded (late:
                                                                      compensating)
refunded              refunded in full, not by the saga (the          (final)
                      merchant at the provider)
====================  ==============================================  ======================

Compensation starts when the activation timeout passes while the subscription is still only
paid (``activation_timeout``), when identity rejects the activation for good
(``activation_rejected:<reason>``), or when a payment arrives after the subscription was
cancelled (``late_payment``). It refunds the whole payment at the provider (idempotency key
derived from the payment id, so a repeated step refunds once), then records ``Refunded`` and
``Cancelled`` (``payment.refunded`` and ``subscription.cancelled``; the latter only if the
subscription had not ended before). A subscription stuck in ``compensating`` (the provider
refused the refund: the step is in ``billing.saga.dlq``) is listed by
``GET /sagas?state=compensating``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, get_args

from tributary.billing.events import (
    ActivationConfirmed,
    ActivationTimeoutScheduled,
    Cancelled,
    CancelReason,
    CheckoutFailed,
    CompensationStarted,
    DomainEvent,
    PaymentFailed,
    PaymentSucceeded,
    Refunded,
    SubscriptionRequested,
)

SagaState = Literal[
    "awaiting_payment",
    "awaiting_activation",
    "completed",
    "compensating",
    "compensated",
    "failed",
    "cancelled",
    "refunded",
]
SAGA_STATES: tuple[SagaState, ...] = get_args(SagaState)
FINAL: frozenset[SagaState] = frozenset({"compensated", "refunded"})

SagaStep = Literal["activation_timeout", "refund"]
"""The saga's own steps: ``billing.saga`` commands billing sends itself."""
TIMEOUT_STEP: SagaStep = "activation_timeout"
REFUND_STEP: SagaStep = "refund"


def cancel_reason_for(compensation: str) -> CancelReason:
    """The ``subscription.cancelled`` reason a compensation ends the subscription with."""
    for reason in ("activation_timeout", "activation_rejected"):
        if compensation == reason or compensation.startswith(f"{reason}:"):
            return reason
    return "refunded"


@dataclass(frozen=True)
class SagaFold:
    """The saga as far as the events so far say."""

    state: SagaState = "awaiting_payment"
    reason: str | None = None
    """Why it is in its state: the compensation's reason, the failure's, the cancellation's
    or the refund's; None otherwise."""
    pending_timeout_at: datetime | None = None
    """When the activation timeout fires (``awaiting_activation`` only)."""


def advance(saga: SagaFold, event: DomainEvent) -> SagaFold:
    """The saga after ``event`` (it happened: nothing here refuses it)."""
    if isinstance(event, SubscriptionRequested):
        return SagaFold()
    if isinstance(event, CheckoutFailed | PaymentFailed):
        return SagaFold("failed", event.reason)
    if isinstance(event, PaymentSucceeded):
        # paid after cancelling: the money goes back (CompensationStarted follows at once)
        return SagaFold("compensating" if event.late else "awaiting_activation")
    if isinstance(event, ActivationTimeoutScheduled):
        if saga.state != "awaiting_activation":
            return saga
        return replace(saga, pending_timeout_at=event.due_at)
    if isinstance(event, ActivationConfirmed):
        return SagaFold("completed")
    if isinstance(event, CompensationStarted):
        return SagaFold("compensating", event.reason)
    if isinstance(event, Refunded):
        if not event.full:
            return saga
        if saga.state == "compensating":
            return SagaFold("compensated", saga.reason)
        return SagaFold("refunded", event.reason)
    if isinstance(event, Cancelled):
        if saga.state in FINAL:
            return saga  # the Cancelled a full refund appends: the refund said it all
        return SagaFold("cancelled", event.reason)
    return saga  # CheckoutCreated, ActivationRejected (CompensationStarted follows)
