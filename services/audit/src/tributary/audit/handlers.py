from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from tributary.audit.chain import append_row
from tributary.audit.checkpoints import Signer, checkpoint, last_checkpoint_seq
from tributary.contracts.catalog import catalog
from tributary.contracts.envelope import Event
from tributary.contracts.events import AuditCheckpointV1, Payload, UserErasedV1, payload_type
from tributary.contracts.pii import mask_payload
from tributary.messaging.bus import Handlers
from tributary.messaging.db import as_utc, now
from tributary.messaging.uow import UnitOfWork

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (None for anything else, or the all-zero id)."""
    match = _TRACEPARENT.match(traceparent or "")
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


@dataclass(frozen=True)
class Checkpointing:
    signer: Signer
    every: int
    """Sign the head once this many entries follow the last checkpoint."""


async def record_event(
    event: Event[Payload],
    uow: UnitOfWork,
    *,
    pii_key: bytes | None = None,
    checkpoints: Checkpointing | None = None,
) -> None:
    # the runtime hands over the payload upcast to the latest version, so the data is masked
    # by that version's schema; the envelope keeps the type as it was received
    payload = event.data
    data = event.data_dict()
    if pii_key:
        data = mask_payload(payload.routing_key, data, style="hash", key=pii_key)
    else:
        data = mask_payload(payload.routing_key, data)
    row = await append_row(
        uow.session,
        {
            "event_id": event.id,
            "type": event.type,
            "data_type": payload.routing_key,
            "source": event.source,
            "subject": event.subject,
            "correlation_id": event.correlationid,
            "causation_id": event.causationid,
            "event_time": as_utc(event.time),
            "recorded_at": now(),
            "data": data,
            "trace_id": trace_id(event.traceparent),
        },
    )
    if (
        checkpoints is not None
        and row["seq"] - await last_checkpoint_seq(uow.session) >= checkpoints.every
    ):
        await checkpoint(uow, checkpoints.signer)


async def record_erasure(
    event: Event[Payload],
    uow: UnitOfWork,
    *,
    pii_key: bytes | None = None,
    checkpoints: Checkpointing | None = None,
) -> None:
    """Record the erasure like any event, and sweep audit's DLQ of messages about the user.

    The entries already in the chain stay: they hold the user id and masked or keyed-hash
    values only (never a whole address or name), and removing one would break the chain.
    """
    erasure = cast(UserErasedV1, event.data)
    await uow.erase_person(erasure.user_id)  # the sweep first: it holds no database lock
    await record_event(event, uow, pii_key=pii_key, checkpoints=checkpoints)


def audited_types() -> list[type[Payload]]:
    """The latest payload model of every event type in the catalog but audit's own
    checkpoints (commands are not events)."""
    return [
        payload_type(spec.latest.routing_key)
        for spec in catalog()
        if spec.kind == "event" and spec.name != AuditCheckpointV1.event_type
    ]


async def ignore_checkpoint(event: Event[Payload], uow: UnitOfWork) -> None:
    """Audit's own checkpoints come back to it: the catalog lists audit as their consumer so
    that the outbox's mandatory publish always finds a queue. They are not recorded in the
    chain (each would call for a checkpoint of its own); ``audit_checkpoints`` holds them."""


def build_handlers(
    pii_key: bytes | None = None, checkpoints: Checkpointing | None = None
) -> Handlers:
    """One handler for every event type; older versions reach it upcast."""
    handlers: dict[type[Payload], Any] = dict.fromkeys(
        audited_types(), partial(record_event, pii_key=pii_key, checkpoints=checkpoints)
    )
    handlers[UserErasedV1] = partial(record_erasure, pii_key=pii_key, checkpoints=checkpoints)
    handlers[AuditCheckpointV1] = ignore_checkpoint
    return handlers
