"""``POST /webhooks/payments``: the provider's signed webhooks, verified, deduplicated, applied.

In this order, each refusal counted in ``tributary_billing_webhooks_total{outcome}``:

===============  ======  ==============================================================
outcome          status  when
===============  ======  ==============================================================
oversized        413     the body is over ``BILLING_WEBHOOK_MAX_BYTES`` (never read past it)
unsigned         401     ``webhook-id``, ``webhook-timestamp`` or ``webhook-signature`` missing
malformed        400     the id is not 1 to 200 printable ASCII characters, the timestamp not
                         Unix seconds
stale            400     the timestamp is more than 5 minutes from now (either way): a
                         replay of an old capture, or a clock that is off
forged           401     no signature matches any of ``BILLING_WEBHOOK_SECRETS`` (HMAC-SHA256
                         over ``id.timestamp.body``, compared in constant time by the
                         standardwebhooks package)
invalid_payload  400     signed, but not the JSON the provider sends
replay_conflict  409     a webhook id seen before, with another body: nothing applied
conflict         409     the subscription kept changing under it: retry (the provider does)
===============  ======  ==============================================================

Accepted webhooks answer 200 with ``{"status": …}``: ``accepted`` (events appended),
``duplicate`` (this webhook id was applied before: nothing new), ``no_change`` (the change
was recorded already, under another webhook id), ``unmatched`` (no such subscription, another
checkout, another amount) or ``ignored`` (a type billing does not handle, or a change the
subscription's state refuses): those two are logged and counted, never retried.

The webhook's receipt (id and SHA-256 of the body), the domain events, the integration events
(outbox), the saga's next step (a paid subscription's activation timeout, scheduled) and the
projections commit in one transaction; nothing else is done before the answer, so the
provider gets it fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tributary.billing.commands import Billing, payment_id_for
from tributary.billing.events import DomainEvent
from tributary.billing.eventstore import ConcurrencyConflict
from tributary.billing.metrics import BillingMetrics
from tributary.billing.models import WebhookReceipt
from tributary.billing.subscription import InvalidTransition, Subscription
from tributary.messaging.bus import Bus
from tributary.messaging.db import now
from tributary.messaging.uow import UnitOfWork
from tributary.service.auth import public
from tributary.service.problems import Problem

log = logging.getLogger("tributary.billing.webhooks")

T = TypeVar("T")

PATH = "/webhooks/payments"
TOLERANCE_SECONDS = 300
"""Standard Webhooks' tolerance (and the standardwebhooks package's, which checks it too)."""
HANDLED = ("payment.succeeded", "payment.failed", "payment.refunded")


class Rejected(Exception):
    """A webhook refused before anything is applied: why (the metric's outcome) and status."""

    def __init__(self, outcome: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.status = status
        self.detail = detail

    def problem(self) -> Problem:
        headers = {"WWW-Authenticate": 'Webhook-Signature realm="payments"'}
        return Problem(self.status, self.detail, headers=headers if self.status == 401 else None)


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable() and " " not in value


def verify(
    body: bytes, headers: Mapping[str, str], signers: Sequence[Webhook], at: datetime
) -> str:
    """The webhook id of a webhook signed by one of ``signers`` within the tolerance of
    ``at``; :class:`Rejected` (unsigned, malformed, stale, forged) otherwise."""
    lowered = {k.lower(): v for k, v in headers.items()}
    webhook_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signature = lowered.get("webhook-signature")
    if not (webhook_id and stamp and signature):
        raise Rejected(
            "unsigned", 401, "The webhook is not signed (webhook-id, -timestamp, -signature)."
        )
    if len(webhook_id) > 200 or not _printable(webhook_id):
        raise Rejected("malformed", 400, "webhook-id is not 1 to 200 printable ASCII characters.")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise Rejected("malformed", 400, "webhook-timestamp is not a Unix time in seconds.")
    if abs(at.timestamp() - int(stamp)) > TOLERANCE_SECONDS:
        raise Rejected("stale", 400, "webhook-timestamp is more than 5 minutes from now.")
    signed = {"webhook-id": webhook_id, "webhook-timestamp": stamp, "webhook-signature": signature}
    for signer in signers:
        try:
            signer.verify(body, signed, json_parse=False)
        except WebhookVerificationError as exc:
            if "timestamp" in str(exc):  # crossed the tolerance while being checked
                raise Rejected(
                    "stale", 400, "webhook-timestamp is more than 5 minutes from now."
                ) from None
            continue
        except ValueError:  # a signature list or body the package cannot read: no match
            continue
        return webhook_id
    raise Rejected("forged", 401, "No signature of the webhook matches a secret of billing's.")


class NoticeData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    checkout_id: Annotated[str, Field(min_length=1, max_length=40)]
    reference: Annotated[str, Field(min_length=1, max_length=100)]
    amount_cents: Annotated[int, Field(ge=1, le=10**12)]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    payment_id: Annotated[str, Field(min_length=1, max_length=40)] | None = None
    refund_id: Annotated[str, Field(min_length=1, max_length=40)] | None = None
    reason: Annotated[str, Field(max_length=500)] | None = None
    paid_at: AwareDatetime | None = None
    failed_at: AwareDatetime | None = None
    refunded_at: AwareDatetime | None = None


class Notice(BaseModel):
    """The provider's webhook body: ``{"type", "timestamp", "data"}`` (Standard Webhooks)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["payment.succeeded", "payment.failed", "payment.refunded"]
    timestamp: AwareDatetime
    data: NoticeData


def parse(body: bytes) -> Notice | str:
    """The notice, or the type of a webhook billing does not handle; :class:`Rejected`."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise Rejected("invalid_payload", 400, "The webhook body is not JSON.") from None
    kind = document.get("type") if isinstance(document, dict) else None
    if isinstance(kind, str) and kind not in HANDLED and len(kind) <= 100:
        return kind
    try:
        notice = Notice.model_validate(document)
    except (ValidationError, RecursionError):
        raise Rejected(
            "invalid_payload", 400, "The webhook body is not a payment notice."
        ) from None
    data = notice.data
    needs = {
        "payment.succeeded": (data.payment_id, data.paid_at),
        "payment.failed": (data.failed_at,),
        "payment.refunded": (data.payment_id, data.refund_id, data.refunded_at),
    }[notice.type]
    if any(value is None for value in needs):
        raise Rejected("invalid_payload", 400, f"The {notice.type} notice lacks a field.")
    return notice


def _given(value: T | None) -> T:
    """A field ``parse`` made sure of."""
    if value is None:
        raise Rejected("invalid_payload", 400, "The notice lacks a field.")
    return value


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected("oversized", 413, f"The webhook body is larger than {limit} bytes.")
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected("oversized", 413, f"The webhook body is larger than {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Decision:
    outcome: str
    subscription: Subscription | None = None
    decided: list[DomainEvent] = field(default_factory=list)


@dataclass
class Receiver:
    billing: Billing
    metrics: BillingMetrics
    signers: list[Webhook]
    max_bytes: int

    async def receive(self, bus: Bus, webhook_id: str, body: bytes, notice: Notice | str) -> str:
        """Apply a verified webhook once: its receipt, the events it causes, their integration
        events and the projections in one transaction (retried on a concurrent append)."""
        digest = hashlib.sha256(body).hexdigest()
        kind = notice if isinstance(notice, str) else notice.type

        async def command(uow: UnitOfWork) -> str:
            session = uow.session
            receipt = await session.get(WebhookReceipt, webhook_id)
            if receipt is not None:
                if receipt.body_hash != digest:
                    raise Rejected(
                        "replay_conflict", 409, "This webhook id was received with another body."
                    )
                return "duplicate"
            # read and decide first, then write: concurrent webhooks of one subscription
            # decide side by side and the append's version check tells who was first
            decision = (
                Decision("ignored")
                if isinstance(notice, str)
                else await self.decide(session, webhook_id, notice)
            )
            session.add(
                WebhookReceipt(
                    webhook_id=webhook_id,
                    body_hash=digest,
                    type=kind[:40],
                    outcome=decision.outcome,
                    stream_id=None if isinstance(notice, str) else notice.data.reference[:60],
                )
            )
            try:
                await session.flush()
            except IntegrityError:  # the same webhook, committed alongside: look again
                raise ConcurrencyConflict(f"webhook {webhook_id}", 0, None) from None
            if decision.subscription is not None:
                stored = await self.billing.save(
                    uow, decision.subscription, decision.decided, cause=webhook_id
                )
                for event in stored:
                    self.metrics.appended.labels(event.type).inc()
            return decision.outcome

        return await self.billing.execute(bus, "webhook", command)

    def _unmatched(self, kind: str, reason: str, reference: str) -> Decision:
        log.warning("webhook %s for %s matches no subscription: %s", kind, reference, reason)
        self.metrics.unmatched.labels(kind, reason).inc()
        return Decision("unmatched")

    async def decide(self, session: AsyncSession, webhook_id: str, notice: Notice) -> Decision:
        data = notice.data
        subscription = await self.billing.load(session, data.reference)
        if not subscription.exists:
            return self._unmatched(notice.type, "unknown_subscription", data.reference)
        if subscription.checkout_id not in (None, data.checkout_id):
            return self._unmatched(notice.type, "other_checkout", data.reference)
        if notice.type != "payment.refunded" and (
            (data.amount_cents, data.currency) != (subscription.amount_cents, subscription.currency)
        ):
            return self._unmatched(notice.type, "other_amount", data.reference)
        if (
            notice.type == "payment.refunded"
            and data.payment_id != subscription.provider_payment_id
        ):
            return self._unmatched(notice.type, "other_payment", data.reference)
        payment_id = payment_id_for(data.checkout_id)
        decided: list[DomainEvent]
        try:
            if notice.type == "payment.succeeded":
                decided = subscription.payment_succeeded(
                    payment_id=payment_id,
                    provider_payment_id=_given(data.payment_id),
                    provider_event_id=webhook_id,
                    paid_at=_given(data.paid_at),
                    activation_due_at=now() + self.billing.activation_timeout,
                )
            elif notice.type == "payment.failed":
                decided = subscription.payment_failed(
                    payment_id=payment_id,
                    provider_event_id=webhook_id,
                    reason=data.reason or "declined",
                    at=_given(data.failed_at),
                )
            else:
                decided = subscription.refunded(
                    refund_id=_given(data.refund_id),
                    provider_event_id=webhook_id,
                    amount_cents=data.amount_cents,
                    reason=data.reason,
                    at=_given(data.refunded_at),
                )
        except InvalidTransition as exc:
            log.warning("webhook %s ignored: %s", webhook_id, exc)
            self.metrics.unmatched.labels(notice.type, "invalid_transition").inc()
            return Decision("ignored")
        return Decision("accepted" if decided else "no_change", subscription, decided)


def router() -> APIRouter:
    found = APIRouter(tags=["webhooks"])

    @found.post(PATH, dependencies=[public()], response_model=None)
    async def payment_webhook(request: Request) -> JSONResponse:
        """A webhook from the payment provider, authenticated by its Standard Webhooks
        signature (not a token). See the module documentation for every answer."""
        receiver: Receiver = request.app.state.webhooks
        counted = request.scope.setdefault("state", {})
        try:
            body = await read_body(request, receiver.max_bytes)
            webhook_id = verify(body, request.headers, receiver.signers, now())
            notice = parse(body)
            outcome = await receiver.receive(request.app.state.bus, webhook_id, body, notice)
        except Rejected as exc:
            receiver.metrics.webhooks.labels(exc.outcome).inc()
            counted["webhook_counted"] = True
            raise exc.problem() from None
        except ConcurrencyConflict:
            receiver.metrics.webhooks.labels("conflict").inc()
            counted["webhook_counted"] = True
            raise Problem(
                409, "The subscription kept changing while this webhook was applied; retry."
            ) from None
        except HTTPException as exc:  # the service-wide body limit, met while reading
            if exc.status_code == 413:
                receiver.metrics.webhooks.labels("oversized").inc()
                counted["webhook_counted"] = True
            raise
        receiver.metrics.webhooks.labels(outcome).inc()
        return JSONResponse({"status": outcome})

    return found


class CountRefusedBodies:
    """Pure ASGI, outside the service-wide body limit: a webhook that limit refused before the
    route ran (a ``Content-Length`` over it) is counted as ``oversized`` too."""

    def __init__(self, app: ASGIApp, metrics: BillingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != PATH:
            await self.app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 413:
                state: dict[str, Any] = scope.get("state") or {}
                if not state.get("webhook_counted"):
                    self.metrics.webhooks.labels("oversized").inc()
            await send(message)

        await self.app(scope, receive, watch)
