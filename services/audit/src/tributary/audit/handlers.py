from __future__ import annotations

from functools import partial

from tributary.audit.chain import append
from tributary.audit.models import AuditEntry
from tributary.contracts.catalog import catalog
from tributary.contracts.envelope import Event
from tributary.contracts.events import Payload, payload_type
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


def audited_types() -> list[type[Payload]]:
    """The latest payload model of every event type in the catalog (commands are not events)."""
    return [payload_type(spec.latest.routing_key) for spec in catalog() if spec.kind == "event"]


def build_handlers(pii_key: bytes | None = None) -> Handlers:
    """One handler for every event type; older versions reach it upcast."""
    handler = partial(record_event, pii_key=pii_key)
    return dict.fromkeys(audited_types(), handler)
