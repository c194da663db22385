"""Dead letters as events: what the runtime says when it puts a message into a DLQ.

Whenever a consumer dead-letters a delivery it also writes a ``message.dead_lettered`` event
into its service's outbox (:meth:`QueueConsumer._dead_letter`): the DLQ copy is confirmed
first, then the event is committed in a short transaction of its own, then the delivery is
acked. A crash in between makes duplicates, never a loss: the delivery comes back and is
dead-lettered again, and the event's id and idempotency key derive from the consumer, the
reason and the message, so the outbox keeps one row and every consumer's inbox one event.

The event is foreign input described: it carries identifiers (only if they look like ids),
the reason, counts and an error text masked by :func:`masked_error` -- never the payload.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.events import MessageDeadLetteredV1
from tributary.contracts.pii import scrub_text

DEAD_LETTERED = MessageDeadLetteredV1.event_type
"""``message.dead_lettered``: a dead letter of this type announces nothing (no loop)."""
MAX_ERROR = 500
MASK = "***"
_ID_NAMESPACE = uuid.UUID("5d8c1f0e-3b7a-4e59-9f21-6a0d2c4b8e17")

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
_ROUTING_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}(?:\.[a-z][a-z0-9_]{0,63}){0,7}\.v[1-9][0-9]{0,8}")
_SLOT = re.compile(r"\.s[0-9]{1,4}\Z")
_EXCEPTION = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")
_INT32_MAX = 2**31 - 1
# what SQLAlchemy appends to a database error: the statement, its parameters, a link
_SQL_DETAILS = re.compile(r"\s*(?:\[SQL:|\[parameters:|\(Background on this error).*", re.S)
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_WORD = re.compile(r"\w+")
_ENVELOPE_IDS = frozenset(
    {"specversion", "id", "type", "source", "time", "datacontenttype", "dataschema"}
    | {"idempotencykey", "correlationid", "causationid", "traceparent", "tracestate"}
)
"""CloudEvent attributes that are identifiers or fixed vocabulary; every other value of a
body (its ``data``, ``subject``, unknown extensions) is the message's own text."""


def safe_id(value: object) -> str | None:
    """``value`` if it looks like an id (letters, digits, ``._:-``; no address, no spaces)."""
    return value if isinstance(value, str) and _SAFE_ID.fullmatch(value) else None


def safe_routing_key(value: object) -> str | None:
    """``value`` if it is shaped like a routing key with a version (``user.created.v2``);
    a partitioned type's key without its slot word (``user.created.v2.s7`` → ``user.created.v2``).
    """
    if not isinstance(value, str):
        return None
    value = _SLOT.sub("", value.removeprefix(f"{NAMESPACE}."))
    return value if _ROUTING_KEY.fullmatch(value) else None


def safe_exception(value: object) -> str | None:
    """An exception's type name, if it is one."""
    return value if isinstance(value, str) and _EXCEPTION.fullmatch(value) else None


def clamp_attempts(value: int) -> int:
    return max(0, min(int(value), _INT32_MAX))


def body_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (not JSON, not an object, too deep to read)."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def _leaves(value: Any, *, keys: bool = True) -> Iterator[str]:
    """Every scalar of a JSON value, and every key (but the top level's unless ``keys``),
    as text."""
    stack = [(value, keys)]
    while stack:
        item, with_keys = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if with_keys:
                    yield str(key)
                stack.append((inner, True))
        elif isinstance(item, list):
            stack.extend((inner, True) for inner in item)
        elif item is not None:
            yield str(item)


def body_words(body: bytes) -> frozenset[str]:
    """The words (case-folded) of the message's own text: of the whole body unless it is a
    JSON object; of an object, every value but the envelope's identifiers and vocabulary:
    ``data`` (its values, and the keys of the objects inside it; its own keys are the
    schema's property names an error names), ``subject``, unknown extensions and their
    names."""
    raw = body_object(body)
    if raw is None:
        texts: list[str] = [body.decode(errors="replace")]
    else:
        texts = []
        for name, value in raw.items():
            if name in _ENVELOPE_IDS and isinstance(value, str):
                continue
            if name not in _ENVELOPE_IDS and name not in ("data", "subject"):
                texts.append(name)
            texts.extend(_leaves(value, keys=name != "data"))
    return frozenset(w.casefold() for text in texts for w in _WORD.findall(text) if len(w) > 1)


def masked_error(detail: str, body: bytes) -> str:
    """``detail``'s first line without anything that may be personal data, at most
    :data:`MAX_ERROR` characters: SQL and its parameters cut, addresses masked, quoted
    values masked, and every word that also occurs in the message's own text masked."""
    lines = [line for line in _SQL_DETAILS.sub("", detail).splitlines() if line.strip()]
    text = scrub_text(lines[0].strip() if lines else "")
    text = _QUOTED.sub(lambda m: f"{m.group(0)[0]}{MASK}{m.group(0)[0]}", text)
    own = body_words(body)
    text = _WORD.sub(lambda m: MASK if m.group(0).casefold() in own else m.group(0), text)
    return text[:MAX_ERROR]


def idempotency_key(
    consumer: str,
    reason: str,
    message_id: str | None,
    body: bytes,
    announced_before: str | None = None,
) -> str:
    """One key per consumer, reason and message: the same delivery dead-lettered again (a
    crash before its ack, a redelivery) announces the same event. A copy replayed from the
    DLQ names the announcement of its last dead-lettering (``announced_before``): failing
    again, it is announced anew."""
    parts = (consumer, reason, message_id or "", announced_before or "")
    digest = hashlib.sha256("\x00".join(parts).encode() + b"\x00" + body).hexdigest()
    return f"{DEAD_LETTERED}:{digest[:48]}"


def event_id(key: str) -> str:
    """The announcement's event id, fixed by its idempotency key (the outbox keeps one row)."""
    return str(uuid.uuid5(_ID_NAMESPACE, key))


def announcement(
    *,
    service: str,
    consumer: str,
    queue: str,
    dlq: str,
    reason: str,
    detail: str,
    attempts: int,
    body: bytes,
    message_type: str | None,
    message_id: str | None,
    correlation_id: str | None,
    exception: str | None,
    at: datetime,
) -> MessageDeadLetteredV1:
    """The ``message.dead_lettered`` payload; every value from the message filtered or masked."""
    return MessageDeadLetteredV1(
        service=service,
        consumer=consumer,
        queue=queue,
        dlq=dlq,
        message_type=safe_routing_key(message_type),
        message_id=safe_id(message_id),
        correlation_id=safe_id(correlation_id),
        reason=reason,
        exception=safe_exception(exception),
        attempts=clamp_attempts(attempts),
        error=masked_error(detail, body),
        dead_lettered_at=at,
    )
