from __future__ import annotations

from functools import partial
from typing import Any, cast

from tributary.audit.chain import append
from tributary.audit.models import AuditEntry
from tributary.contracts.catalog import catalog
from tributary.contracts.envelope import Event
from tributary.contracts.events import Payload, UserErasedV1, payload_type
from tributary.contracts.pii import mask_payload
from tributary.messaging.bus import Handlers
from tributary.messaging.db import as_utc, now
from tributary.messaging.uow import UnitOfWork


async def record_event(
    event: Event[Payload], uow: UnitOfWork, *, pii_key: bytes | None = None
) -> None:
    # the runtime hands over the payload upcast to the latest version, so the data is masked
    # by that version's schema; the envelope keeps the type as it was received
    payload = event.data
    data = event.data_dict()
    if pii_key:
        data = mask_payload(payload.routing_key, data, style="hash", key=pii_key)
    else:
        data = mask_payload(payload.routing_key, data)
    await append(
        uow.session,
        AuditEntry(
            event_id=event.id,
            type=event.type,
            data_type=payload.routing_key,
            source=event.source,
            subject=event.subject,
            correlation_id=event.correlationid,
            causation_id=event.causationid,
            event_time=as_utc(event.time),
            recorded_at=now(),
            data=data,
        ),
    )


async def record_erasure(
    event: Event[Payload], uow: UnitOfWork, *, pii_key: bytes | None = None
) -> None:
    """Record the erasure like any event, and sweep audit's DLQ of messages about the user.

    The entries already in the chain stay: they hold the user id and masked or keyed-hash
    values only (never a whole address or name), and removing one would break the chain.
    """
    erasure = cast(UserErasedV1, event.data)
    await uow.erase_person(erasure.user_id)  # the sweep first: it holds no database lock
    await record_event(event, uow, pii_key=pii_key)


def audited_types() -> list[type[Payload]]:
    """The latest payload model of every event type audit consumes by the catalog: every
    event but its own checkpoints (commands are not events)."""
    return [
        payload_type(spec.latest.routing_key)
        for spec in catalog()
        if spec.kind == "event" and "audit" in spec.consumers
    ]


def build_handlers(pii_key: bytes | None = None) -> Handlers:
    """One handler for every event type; older versions reach it upcast."""
    handlers: dict[type[Payload], Any] = dict.fromkeys(
        audited_types(), partial(record_event, pii_key=pii_key)
    )
    handlers[UserErasedV1] = partial(record_erasure, pii_key=pii_key)
    return handlers
