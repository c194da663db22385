"""AMQP headers the runtime sets, and copying a delivery for a retry queue or a DLQ."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

REASON = "x-tributary-reason"
ERROR = "x-tributary-error"
EXCEPTION = "x-tributary-exception"
"""Type name of the exception behind an ``unexpected_error`` or a failed attempt."""
CONSUMER = "x-tributary-consumer"
ANNOUNCEMENT = "x-tributary-announcement"
"""On a DLQ copy: the id of the ``message.dead_lettered`` event that announced it."""
ANNOUNCED_BEFORE = "x-tributary-announced-before"
"""On a copy replayed from a DLQ: the announcement of its last dead-lettering. Part of the
next announcement's idempotency key: dead-lettered again after a replay is a new event."""
ATTEMPTS = "x-tributary-attempts"
RETRIES = "x-tributary-retries"
FIRST_FAILURE = "x-tributary-first-failure"
LAST_FAILURE = "x-tributary-last-failure"
ROUTING_KEY = "x-tributary-routing-key"
DELIVERY_COUNT = "x-delivery-count"
"""Set by a quorum queue on a redelivery: how many times the delivery was handed back."""
REPLAY = "x-tributary-replay"
REPLAY_FORCED = "x-tributary-replay-forced"
PRODUCER = "x-tributary-producer"
"""The original producer of a copy the runtime or the operator made (retry, DLQ, replay).

Trusted only on a delivery whose ``user_id`` is the consuming service's own user or the
operator's; anyone else's ``user_id`` is its producer (see :func:`producer_of`)."""

# broker bookkeeping that must not travel with a copy (it would accumulate)
BROKER_HEADERS = ("x-death", "x-delivery-count", "x-first-death-", "x-last-death-")


def text(value: Any) -> str:
    """A header value as text; bytes that are not UTF-8 are shown, not fatal."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def plain(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Header values any publish accepts: 64-bit integers as they are, everything else as text."""
    out: dict[str, Any] = {}
    for name, value in (values or {}).items():
        if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            out[name] = value
        else:
            out[name] = text(value)[:1000]
    return out


def header(message: AbstractIncomingMessage, name: str, default: Any = None) -> Any:
    return (message.headers or {}).get(name, default)


def int_header(message: AbstractIncomingMessage, name: str) -> int:
    try:
        return int(text(header(message, name, 0)))
    except ValueError:
        return 0


def original_routing_key(message: AbstractIncomingMessage) -> str:
    """The routing key it was first published with (a retried copy arrives under another)."""
    return text(header(message, ROUTING_KEY) or message.routing_key or "")


def _flag(message: AbstractIncomingMessage, name: str) -> bool:
    return text(header(message, name, "")).lower() in {"1", "true", "yes"}


def is_replay(message: AbstractIncomingMessage) -> bool:
    return _flag(message, REPLAY)


def is_forced_replay(message: AbstractIncomingMessage) -> bool:
    """Replay tooling's ``--force``: redo irreversible side effects too."""
    return is_replay(message) and _flag(message, REPLAY_FORCED)


def producer_of(
    message: AbstractIncomingMessage, *, prefix: str, trusted: Mapping[str, str | None]
) -> str | None:
    """Who produced this delivery, as a catalog name (a service or a foreign producer).

    The broker guarantees ``user_id`` is the publishing connection's user. A copy published
    by a ``trusted`` user (the consuming service itself, the operator) names its original
    producer in :data:`PRODUCER`; without that header it is that user's own publication, its
    producer the value ``trusted`` maps the user to. Any other user is the producer, its name
    without ``prefix``. ``None`` when nobody can be named: no ``user_id``, a user outside the
    prefix, an operator's publication without the header.
    """
    user = message.user_id
    if not user:
        return None
    if user in trusted:
        recorded = header(message, PRODUCER)
        return trusted[user] if recorded is None else (text(recorded)[:200] or None)
    if not user.startswith(prefix):
        return None
    return user[len(prefix) :] or None


def now_iso() -> str:
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    """An aware time as a header value: ``2026-01-09T12:00:00.123Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def copy_of(
    message: AbstractIncomingMessage,
    extra: Mapping[str, Any],
    *,
    drop: Collection[str] = (),
) -> aio_pika.Message:
    """The same body and properties, broker bookkeeping and ``drop`` left out, ``extra`` added.

    ``user_id`` is left out: the publisher sets its own (the broker rejects any other); a
    copy that must keep naming its producer carries :data:`PRODUCER`.
    """
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if not k.startswith(BROKER_HEADERS) and k not in drop
    }
    headers.update(extra)
    return with_headers(message, headers)


def with_headers(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """A persistent message with ``message``'s body and properties and these ``headers``
    (``user_id`` left out: the broker rejects one that is not the publishing user)."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
