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
]


class PermanentError(Exception):
    """Retrying cannot help (bad data, a rule the event breaks): dead-letter at once."""


class Rejected(Exception):
    """A delivery that cannot be handled; ``reason`` goes into the DLQ headers."""

    def __init__(self, reason: DlqReason, detail: str) -> None:
        self.reason: DlqReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class TopologyMismatch(RuntimeError):
    """An existing queue or exchange was declared with other arguments than ours."""


class Unroutable(RuntimeError):
    """The broker returned a mandatory message: no queue is bound to its routing key."""
