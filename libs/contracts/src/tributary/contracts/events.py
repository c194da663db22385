"""Typed payload models: one class per event (or command) type and major version.

Each model mirrors the JSON Schema the catalog names for it (``contracts/schemas/``) field by
field; a test keeps the two in step. The models ignore unknown fields, so a consumer keeps
working when a producer adds an optional field within the same major version.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class UnknownPayload(KeyError):
    """No payload model is registered for the routing key."""


def _prefixed_id(prefix: str) -> Any:
    return Field(pattern=rf"^{prefix}_[A-Za-z0-9]{{8,40}}$")


UserId = Annotated[str, _prefixed_id("usr")]
WorkspaceId = Annotated[str, _prefixed_id("ws")]
ApiKeyId = Annotated[str, _prefixed_id("key")]
SubscriptionId = Annotated[str, _prefixed_id("sub")]
PaymentId = Annotated[str, _prefixed_id("pay")]
EmailId = Annotated[str, _prefixed_id("eml")]
CommentId = Annotated[str, _prefixed_id("cmt")]
ReportId = Annotated[str, _prefixed_id("rpt")]
DocumentId = Annotated[str, _prefixed_id("doc")]

Email = Annotated[str, Field(max_length=254)]
"""An email address (the schemas check ``format: email``)."""
Url = Annotated[str, Field(max_length=2048)]
"""An absolute URL (the schemas check ``format: uri``)."""
Locale = Annotated[str, Field(pattern=r"^[a-z]{2}-[A-Z]{2}$")]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
MessageId = Annotated[str, Field(min_length=3, max_length=250, pattern=r"^<[^<>@\s]+@[^<>@\s]+>$")]
Timestamp = AwareDatetime
"""A timezone-aware datetime (RFC 3339 ``date-time`` on the wire)."""

Plan = Literal["free", "starter", "pro"]
PaidPlan = Literal["starter", "pro"]
Role = Literal["member", "admin", "owner"]
Template = Literal["welcome", "subscription_activated", "notification"]


class Payload(BaseModel):
    """The ``data`` of one event type and version; subclasses set ``event_type`` and ``version``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_type: ClassVar[str]
    """The catalog type, ``user.created``."""
    version: ClassVar[int]
    """The major version, ``1``."""
    routing_key: ClassVar[str]
    """``user.created.v1``: set from ``event_type`` and ``version`` for every subclass."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "event_type" in cls.__dict__ or "version" in cls.__dict__:
            cls.routing_key = f"{cls.event_type}.v{cls.version}"


class UserCreatedV1(Payload):
    """A user signed up (deprecated: superseded by v2)."""

    event_type: ClassVar[str] = "user.created"
    version: ClassVar[int] = 1

    user_id: UserId
    email: Email
    name: Annotated[str, Field(min_length=1, max_length=200)]
    plan: Plan
    locale: Locale
    created_at: Timestamp


class UserCreatedV2(Payload):
    """A user signed up."""

    event_type: ClassVar[str] = "user.created"
    version: ClassVar[int] = 2

    user_id: UserId
    email: Email
    given_name: Annotated[str, Field(min_length=1, max_length=200)]
    family_name: Annotated[str, Field(max_length=200)]
    plan: Plan
    locale: Locale
    created_at: Timestamp


class UserEmailChangedV1(Payload):
    """A user changed their email address."""

    event_type: ClassVar[str] = "user.email_changed"
    version: ClassVar[int] = 1

    user_id: UserId
    old_email: Email
    new_email: Email
    changed_at: Timestamp


class UserErasedV1(Payload):
    """A user's personal data was erased (GDPR Art. 17); carries no personal data itself."""

    event_type: ClassVar[str] = "user.erased"
    version: ClassVar[int] = 1

    user_id: UserId
    erased_at: Timestamp


class RoleChangedV1(Payload):
    """A user's role changed; ``changed_by`` is absent when the system changed it."""

    event_type: ClassVar[str] = "role.changed"
    version: ClassVar[int] = 1

    user_id: UserId
    old_role: Role
    new_role: Role
    changed_by: UserId | None = None
    changed_at: Timestamp


class ApiKeyRevokedV1(Payload):
    """An API key was revoked."""

    event_type: ClassVar[str] = "api_key.revoked"
    version: ClassVar[int] = 1

    api_key_id: ApiKeyId
    user_id: UserId
    revoked_at: Timestamp


class SubscriptionActivatedV1(Payload):
    """A paid plan became active after a successful payment."""

    event_type: ClassVar[str] = "subscription.activated"
    version: ClassVar[int] = 1

    subscription_id: SubscriptionId
    user_id: UserId
    plan: PaidPlan
    payment_id: PaymentId
    activated_at: Timestamp


class SubscriptionActivationRejectedV1(Payload):
    """Identity will not activate the plan a payment paid for (billing refunds it)."""

    event_type: ClassVar[str] = "subscription.activation_rejected"
    version: ClassVar[int] = 1

    payment_id: PaymentId
    user_id: UserId
    plan: PaidPlan
    reason: Literal["unknown_user", "already_subscribed"]
    rejected_at: Timestamp


class WorkspaceCreatedV1(Payload):
    """The first workspace of a new user was created."""

    event_type: ClassVar[str] = "workspace.created"
    version: ClassVar[int] = 1

    workspace_id: WorkspaceId
    owner_id: UserId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    created_at: Timestamp


class EmailSentV1(Payload):
    """An email was accepted by the SMTP server."""

    event_type: ClassVar[str] = "email.sent"
    version: ClassVar[int] = 1

    email_id: EmailId
    message_id: MessageId
    to: Email
    template: Template
    user_id: UserId | None = None
    sent_at: Timestamp


class EmailFailedV1(Payload):
    """An email could not be delivered."""

    event_type: ClassVar[str] = "email.failed"
    version: ClassVar[int] = 1

    email_id: EmailId
    to: Email
    template: Template
    reason: Annotated[str, Field(max_length=500)]
    permanent: bool
    user_id: UserId | None = None
    failed_at: Timestamp


class PaymentSucceededV1(Payload):
    """The payment provider confirmed a payment."""

    event_type: ClassVar[str] = "payment.succeeded"
    version: ClassVar[int] = 1

    payment_id: PaymentId
    user_id: UserId
    amount_cents: Annotated[int, Field(ge=1)]
    currency: Currency
    plan: PaidPlan
    provider_reference: Annotated[str, Field(min_length=1, max_length=100)]
    paid_at: Timestamp


class PaymentFailedV1(Payload):
    """The payment provider reported a failed payment."""

    event_type: ClassVar[str] = "payment.failed"
    version: ClassVar[int] = 1

    payment_id: PaymentId
    user_id: UserId
    amount_cents: Annotated[int, Field(ge=1)]
    currency: Currency
    reason: Annotated[str, Field(max_length=500)]
    failed_at: Timestamp


class PaymentRefundedV1(Payload):
    """The payment provider refunded (part of) a payment; one event per refund."""

    event_type: ClassVar[str] = "payment.refunded"
    version: ClassVar[int] = 1

    payment_id: PaymentId
    user_id: UserId
    amount_cents: Annotated[int, Field(ge=1)]
    currency: Currency
    provider_reference: Annotated[str, Field(min_length=1, max_length=100)]
    full: bool | None = None
    reason: Annotated[str, Field(max_length=500)] | None = None
    refunded_at: Timestamp


class SubscriptionCancelledV1(Payload):
    """A subscription ended: cancelled by its user before paying, or by a full refund."""

    event_type: ClassVar[str] = "subscription.cancelled"
    version: ClassVar[int] = 1

    subscription_id: SubscriptionId
    user_id: UserId
    plan: PaidPlan
    reason: Literal["cancelled_by_user", "refunded", "activation_rejected", "activation_timeout"]
    payment_id: PaymentId | None = None
    cancelled_at: Timestamp


class CommentMentionedV1(Payload):
    """A user was mentioned in a comment (produced outside this repo)."""

    event_type: ClassVar[str] = "comment.mentioned"
    version: ClassVar[int] = 1

    comment_id: CommentId
    document_id: DocumentId
    author_user_id: UserId
    mentioned_user_id: UserId
    excerpt: Annotated[str, Field(max_length=280)]
    url: Url
    mentioned_at: Timestamp


class ReportReadyV1(Payload):
    """A report a user asked for is ready (produced outside this repo)."""

    event_type: ClassVar[str] = "report.ready"
    version: ClassVar[int] = 1

    report_id: ReportId
    user_id: UserId
    report_name: Annotated[str, Field(min_length=1, max_length=200)]
    url: Url
    ready_at: Timestamp


class EmailSendV1(Payload):
    """Command: ask the email service to send one email."""

    event_type: ClassVar[str] = "email.send"
    version: ClassVar[int] = 1

    request_id: uuid.UUID
    to: Email
    template: Template
    subject: Annotated[str, Field(min_length=1, max_length=200)]
    variables: dict[str, Annotated[str, Field(max_length=2000)]] | None = None
    user_id: UserId | None = None
    locale: Locale | None = None
    list_unsubscribe_url: Annotated[Url, Field(pattern=r"^https?://")] | None = None
    """RFC 8058 one-click unsubscribe URL: the email gets ``List-Unsubscribe`` and
    ``List-Unsubscribe-Post`` headers."""


class AuditCheckpointV1(Payload):
    """The audit service signed ``{seq, head, signed_at}`` of its hash chain (Ed25519)."""

    event_type: ClassVar[str] = "audit.checkpoint"
    version: ClassVar[int] = 1

    seq: Annotated[int, Field(ge=1, le=2**63 - 1)]
    head: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    signed_at: Timestamp
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    public_key: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}$")]
    signature: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{86}$")]


class NotificationJobV1(Payload):
    """Command: the notification service's own deferred work, sent to itself when it is due."""

    event_type: ClassVar[str] = "notification.job"
    version: ClassVar[int] = 1

    job: Literal["deliver", "digest", "webhook_attempt"]
    ref: Annotated[str, Field(pattern=r"^[A-Za-z0-9_:.-]{1,120}$")]
    user_id: UserId | None = None


class BillingSagaV1(Payload):
    """Command: one step of a subscription's saga, billing to itself when it is due."""

    event_type: ClassVar[str] = "billing.saga"
    version: ClassVar[int] = 1

    step: Literal["activation_timeout", "refund"]
    subscription_id: SubscriptionId


QueueName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,255}$")]
RoutingKey = Annotated[
    str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}(\.[a-z][a-z0-9_]{0,63}){0,7}\.v[1-9][0-9]{0,8}$")
]
SafeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")]
"""An id as the runtime reports it: letters, digits and ``._:-`` (no address, no spaces)."""


class MessageDeadLetteredV1(Payload):
    """A service's runtime dead-lettered a message (no payload, no personal data)."""

    event_type: ClassVar[str] = "message.dead_lettered"
    version: ClassVar[int] = 1

    service: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    consumer: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,199}$")]
    queue: QueueName
    dlq: QueueName
    message_type: RoutingKey | None = None
    """The routing key (``user.created.v2``) of the dead-lettered message."""
    message_id: SafeId | None = None
    """The CloudEvent id of the dead-lettered event (or the message id of a delivery that was
    not one)."""
    correlation_id: SafeId | None = None
    reason: Annotated[str, Field(pattern=r"^[a-z][a-z_]{0,39}$")]
    exception: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,99}$")] | None = None
    attempts: Annotated[int, Field(ge=0, le=2**31 - 1)]
    error: Annotated[str, Field(max_length=500)]
    dead_lettered_at: Timestamp


PAYLOAD_TYPES: dict[str, type[Payload]] = {
    model.routing_key: model
    for model in (
        UserCreatedV1,
        UserCreatedV2,
        UserEmailChangedV1,
        UserErasedV1,
        RoleChangedV1,
        ApiKeyRevokedV1,
        SubscriptionActivatedV1,
        SubscriptionActivationRejectedV1,
        WorkspaceCreatedV1,
        EmailSentV1,
        EmailFailedV1,
        PaymentSucceededV1,
        PaymentFailedV1,
        PaymentRefundedV1,
        SubscriptionCancelledV1,
        CommentMentionedV1,
        ReportReadyV1,
        AuditCheckpointV1,
        EmailSendV1,
        NotificationJobV1,
        BillingSagaV1,
        MessageDeadLetteredV1,
    )
}
"""Every payload model, by routing key (``user.created.v1``)."""


def payload_type(routing_key: str) -> type[Payload]:
    """The model of ``user.created.v1``; :class:`UnknownPayload` if there is none."""
    try:
        return PAYLOAD_TYPES[routing_key]
    except KeyError:
        raise UnknownPayload(routing_key) from None
