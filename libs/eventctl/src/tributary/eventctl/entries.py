"""What a DLQ message says about its failure, and the filters that select messages."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from tributary.contracts.catalog import NAMESPACE
from tributary.messaging import headers as h


def routing_key_of(event_type: str) -> str:
    """``com.tributary.user.created.v1`` → ``user.created.v1`` (other strings unchanged)."""
    return event_type.removeprefix(f"{NAMESPACE}.")


def type_matches(pattern: str, routing_key: str) -> bool:
    """``user.created`` matches every version; ``user.created.v1`` (or its CE type) only v1."""
    pattern, routing_key = routing_key_of(pattern), routing_key_of(routing_key)
    if routing_key == pattern:
        return True
    version = routing_key.removeprefix(f"{pattern}.v")
    return version != routing_key and version.isdigit()


def parse_instant(value: object) -> datetime | None:
    """An ISO 8601 time (``2026-01-09``, ``2026-01-09T12:00:00.123Z``, ``…+02:00``) as an
    aware UTC time; a time without an offset is UTC. ``None`` for anything else: header
    values are foreign input, whatever they hold this never raises."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and len(value) <= 64:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    try:
        if moment.tzinfo is None or moment.utcoffset() is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (OverflowError, ValueError):  # an offset that leaves datetime's range
        return None


def _deaths(headers: dict[str, Any]) -> list[dict[str, Any]]:
    """``x-death``, newest first: set when the broker itself dead-lettered the message."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return []
    return [d for d in deaths if isinstance(d, dict)]


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return h.text(value)


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(h.text(value))
    except ValueError:
        return None


def _body_type(body: bytes) -> str | None:
    """The CloudEvents ``type`` in a structured-mode body, if it has one."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    value = raw.get("type") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def original_routing_key(message: AbstractIncomingMessage) -> str | None:
    """The routing key the message was first published with (its DLQ copy has another)."""
    headers = dict(message.headers or {})
    if (value := headers.get(h.ROUTING_KEY)) is not None:
        return h.text(value)
    deaths = _deaths(headers)
    keys = deaths[0].get("routing-keys") if deaths else None
    return h.text(keys[0]) if isinstance(keys, list) and keys else None


@dataclass(frozen=True)
class DlqEntry:
    """One DLQ message as an operator sees it (the error text is masked by the runtime)."""

    message_id: str | None
    type: str | None
    reason: str | None
    consumer: str | None
    attempts: int | None
    first_failure: str | None
    last_failure: str | None
    routing_key: str | None
    error: str | None
    correlation_id: str | None

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DlqEntry:
        headers = dict(message.headers or {})
        # dead-lettered by the broker (delivery limit): no runtime headers, an x-death entry
        deaths = _deaths(headers)
        death, oldest = (deaths[0], deaths[-1]) if deaths else ({}, {})
        return cls(
            message_id=message.message_id,
            type=message.type or _body_type(message.body),
            reason=_str(headers.get(h.REASON) or death.get("reason")),
            consumer=_str(headers.get(h.CONSUMER) or death.get("queue")),
            attempts=_int(headers.get(h.ATTEMPTS)),
            first_failure=_str(headers.get(h.FIRST_FAILURE) or oldest.get("time")),
            last_failure=_str(headers.get(h.LAST_FAILURE) or death.get("time")),
            routing_key=original_routing_key(message),
            error=_str(headers.get(h.ERROR)),
            correlation_id=message.correlation_id,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dead_lettered_at(self) -> datetime | None:
        """When it was dead-lettered: the runtime's last-failure header (or the broker's
        x-death time), as aware UTC; ``None`` when neither holds a time."""
        return parse_instant(self.last_failure)


@dataclass(frozen=True)
class Selector:
    """Which messages a command acts on: every filter given must match (none = all)."""

    reasons: frozenset[str] = frozenset()
    types: tuple[str, ...] = ()
    ids: frozenset[str] = frozenset()
    since: datetime | None = None
    """Dead-lettered at or after (aware UTC)."""
    until: datetime | None = None
    """Dead-lettered before (aware UTC)."""
    correlation_ids: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls,
        reasons: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        ids: Iterable[str] | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        correlation_ids: Iterable[str] | None = None,
    ) -> Selector:
        return cls(
            frozenset(reasons or ()),
            tuple(types or ()),
            frozenset(ids or ()),
            since,
            until,
            frozenset(correlation_ids or ()),
        )

    def matches(self, entry: DlqEntry) -> bool:
        if self.reasons and entry.reason not in self.reasons:
            return False
        if self.ids and entry.message_id not in self.ids:
            return False
        if self.correlation_ids and entry.correlation_id not in self.correlation_ids:
            return False
        if self.since is not None or self.until is not None:
            # a message without a readable dead-letter time is outside every window
            at = entry.dead_lettered_at
            if at is None:
                return False
            if self.since is not None and at < self.since:
                return False
            if self.until is not None and at >= self.until:
                return False
        if self.types:
            known = [k for k in (entry.type, entry.routing_key) if k]
            return any(type_matches(t, k) for t in self.types for k in known)
        return True
