"""One valid ``data`` payload per routing key, as it appears on the wire (JSON-ready values).

Tests that need a realistic payload take it from here; use :func:`sample` for a private copy
(optionally with fields replaced or removed) rather than mutating ``SAMPLES``.
"""

from __future__ import annotations

import copy
from typing import Any

USER_ID = "usr_0123456789"
OTHER_USER_ID = "usr_9876543210"
PAYMENT_ID = "pay_0123456789"

SAMPLES: dict[str, dict[str, Any]] = {
    "user.created.v1": {
        "user_id": USER_ID,
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "plan": "free",
        "locale": "en-GB",
        "created_at": "2026-01-01T00:00:00Z",
    },
    "user.created.v2": {
        "user_id": USER_ID,
        "email": "ada@example.com",
        "given_name": "Ada",
        "family_name": "Lovelace",
        "plan": "free",
        "locale": "en-GB",
        "created_at": "2026-01-01T00:00:00Z",
    },
    "user.email_changed.v1": {
        "user_id": USER_ID,
        "old_email": "ada@example.com",
        "new_email": "ada.lovelace@example.org",
        "changed_at": "2026-01-02T09:30:00Z",
    },
    "user.erased.v1": {
        "user_id": USER_ID,
        "erased_at": "2026-01-09T11:00:00Z",
    },
    "role.changed.v1": {
        "user_id": USER_ID,
        "old_role": "member",
        "new_role": "admin",
        "changed_by": OTHER_USER_ID,
        "changed_at": "2026-01-03T10:00:00+01:00",
    },
    "api_key.revoked.v1": {
        "api_key_id": "key_0123456789",
        "user_id": USER_ID,
        "revoked_at": "2026-01-04T12:00:00Z",
    },
    "subscription.activated.v1": {
        "subscription_id": "sub_0123456789",
        "user_id": USER_ID,
        "plan": "pro",
        "payment_id": PAYMENT_ID,
        "activated_at": "2026-01-05T08:00:01Z",
    },
    "workspace.created.v1": {
        "workspace_id": "ws_0123456789",
        "owner_id": USER_ID,
        "name": "Ada's workspace",
        "created_at": "2026-01-01T00:00:02Z",
    },
    "email.sent.v1": {
        "email_id": "eml_0123456789",
        "message_id": "<eml_0123456789@mail.tributary.dev>",
        "to": "ada@example.com",
        "template": "welcome",
        "user_id": USER_ID,
        "sent_at": "2026-01-01T00:00:05Z",
    },
    "email.failed.v1": {
        "email_id": "eml_9876543210",
        "to": "nobody@example.com",
        "template": "notification",
        "reason": "550 5.1.1 mailbox unavailable",
        "permanent": True,
        "user_id": OTHER_USER_ID,
        "failed_at": "2026-01-06T07:00:00Z",
    },
    "payment.succeeded.v1": {
        "payment_id": PAYMENT_ID,
        "user_id": USER_ID,
        "amount_cents": 1900,
        "currency": "EUR",
        "plan": "pro",
        "provider_reference": "ch_3PZx0123456789",
        "paid_at": "2026-01-05T08:00:00Z",
    },
    "payment.failed.v1": {
        "payment_id": "pay_9876543210",
        "user_id": USER_ID,
        "amount_cents": 900,
        "currency": "EUR",
        "reason": "card_declined",
        "failed_at": "2026-01-05T07:59:00Z",
    },
    "payment.refunded.v1": {
        "payment_id": PAYMENT_ID,
        "user_id": USER_ID,
        "amount_cents": 1900,
        "currency": "EUR",
        "provider_reference": "re_0123456789abcdef",
        "full": True,
        "reason": "activation_rejected",
        "refunded_at": "2026-01-05T09:00:00Z",
    },
    "subscription.activation_rejected.v1": {
        "payment_id": PAYMENT_ID,
        "user_id": USER_ID,
        "plan": "pro",
        "reason": "already_subscribed",
        "rejected_at": "2026-01-05T08:00:02Z",
    },
    "subscription.cancelled.v1": {
        "subscription_id": "sub_0123456789",
        "user_id": USER_ID,
        "plan": "pro",
        "reason": "refunded",
        "payment_id": PAYMENT_ID,
        "cancelled_at": "2026-01-05T09:00:01Z",
    },
    "comment.mentioned.v1": {
        "comment_id": "cmt_0123456789",
        "document_id": "doc_0123456789",
        "author_user_id": OTHER_USER_ID,
        "mentioned_user_id": USER_ID,
        "excerpt": "@Ada could you check the numbers in section 2?",
        "url": "https://app.tributary.dev/docs/doc_0123456789#cmt_0123456789",
        "mentioned_at": "2026-01-07T15:20:00Z",
    },
    "report.ready.v1": {
        "report_id": "rpt_0123456789",
        "user_id": USER_ID,
        "report_name": "Q4 revenue by plan",
        "url": "https://app.tributary.dev/reports/rpt_0123456789.csv",
        "ready_at": "2026-01-08T06:00:00Z",
    },
    "audit.checkpoint.v1": {
        "seq": 100,
        "head": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "signed_at": "2026-01-09T12:00:00Z",
        "key_id": "0123456789abcdef",
        "public_key": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
        "signature": "A" * 86,
    },
    "email.send.v1": {
        "request_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "to": "ada@example.com",
        "template": "welcome",
        "subject": "Welcome to Tributary, Ada",
        "variables": {"given_name": "Ada", "plan": "free"},
        "user_id": USER_ID,
        "locale": "en-GB",
        "list_unsubscribe_url": "https://notify.example.com/unsubscribe?token=u1.abc.def",
    },
    "notification.job.v1": {"job": "webhook_attempt", "ref": "wha_0123456789", "user_id": USER_ID},
    "billing.saga.v1": {"step": "activation_timeout", "subscription_id": "sub_0123456789"},
    "message.dead_lettered.v1": {
        "service": "email",
        "consumer": "email",
        "queue": "email.events",
        "dlq": "email.dlq",
        "message_type": "user.created.v2",
        "message_id": "3f1c9a52-7d0e-4c1b-9a77-2b8f5e0d4c11",
        "correlation_id": "4b7e2a9c0d1f4e3a8b6c5d7e9f0a1b2c",
        "reason": "retries_exhausted",
        "exception": "HandlerTimeout",
        "attempts": 9,
        "error": "HandlerTimeout: handler took longer than 60 s",
        "dead_lettered_at": "2026-01-09T12:00:00.123Z",
    },
}


def sample(routing_key: str, **changes: Any) -> dict[str, Any]:
    """A deep copy of the sample of ``routing_key``; a change to ``None`` removes the field."""
    data = copy.deepcopy(SAMPLES[routing_key])
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data
