"""What the runtime knows about the message being handled, in contextvars.

Outbox rows written while a handler (or an HTTP request) runs inherit the correlation id,
causation id and trace context from here, so handlers never pass them by hand.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MessageContext:
    correlation_id: str | None = None
    causation_id: str | None = None
    """The id of the event being handled: the cause of what the handler produces."""
    event_id: str | None = None
    event_type: str | None = None
    consumer: str | None = None
    attempt: int = 1
    is_replay: bool = False
    """Set by replay tooling: handlers suppress irreversible side effects unless forced."""
    replay_forced: bool = False
    """Replay tooling's ``--force``: the operator wants irreversible side effects redone."""


_EMPTY = MessageContext()
_current: ContextVar[MessageContext | None] = ContextVar("tributary_message", default=None)


def current() -> MessageContext:
    return _current.get() or _EMPTY


@contextmanager
def use(ctx: MessageContext) -> Iterator[MessageContext]:
    """Make ``ctx`` current inside the block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


@contextmanager
def correlated(correlation_id: str | None) -> Iterator[MessageContext]:
    """An HTTP request's scope: events it produces carry ``correlation_id`` (new if None)."""
    ctx = replace(current(), correlation_id=correlation_id or new_correlation_id())
    with use(ctx):
        yield ctx


def new_correlation_id() -> str:
    return uuid.uuid4().hex
