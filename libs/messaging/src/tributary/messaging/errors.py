"""Exceptions that tell the runtime what to do with a failed message."""

from __future__ import annotations

from typing import Literal

DlqReason = Literal[
    "malformed",
    "unknown_type",
    "schema_invalid",
    "idempotency_conflict",
    "handler_error",
    "retries_exhausted",
    "upcast_failed",
    "unexpected_error",
    "unauthorized_producer",
    "delivery_limit",
]


class PermanentError(Exception):
    """Retrying cannot help (bad data, a rule the event breaks): dead-letter at once."""


class Rejected(Exception):
    """A delivery that cannot be handled; ``reason`` goes into the DLQ headers."""

    def __init__(self, reason: DlqReason, detail: str) -> None:
        self.reason: DlqReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class InfrastructureError(RuntimeError):
    """The service's database or the broker failed, not the message: pause, don't retry it.

    ``component`` is ``"database"`` or ``"broker"``; the consumer stops taking deliveries, keeps
    the ones in hand unharmed, probes with backoff and resumes.
    """

    def __init__(self, component: Literal["database", "broker"], detail: str) -> None:
        self.component: Literal["database", "broker"] = component
        self.detail = detail
        super().__init__(f"{component} unavailable: {detail}")


class HandlerTimeout(Exception):
    """A handler ran longer than ``handler_timeout_seconds``: a failure of that message."""


class TopologyMismatch(RuntimeError):
    """An existing queue or exchange was declared with other arguments than ours."""


class Unroutable(RuntimeError):
    """The broker returned a mandatory message: no queue is bound to its routing key."""
