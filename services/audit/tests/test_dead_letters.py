"""Dead letters reach the audit log: audit dead-letters a poisoned event like any service, its
runtime announces it (message.dead_lettered, through audit's own outbox), and audit records the
announcement once, with the error masked and nothing of the poisoned event's personal data."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

from tributary.contracts.envelope import new_event
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.testing import announced_dead_letters, read_queue
from tributary.testkit.infra import Found

from .test_api import audit_service

PERSONAL = ("Augusta", "Byron", "ada.byron@example.com")


async def test_a_dead_letter_is_recorded_once_with_its_error_masked_and_no_personal_data(
    tmp_path: Path, rabbitmq: Found
) -> None:
    correlation_id = uuid.uuid4().hex
    poisoned = new_event(
        routing_key="user.created.v2",
        source="/services/identity",
        correlationid=correlation_id,
        # a plan no schema knows: schema_invalid, with a name and an address in the payload
        data=UserCreatedV2.model_construct(
            user_id="usr_0123456789",
            email="ada.byron@example.com",
            given_name="Augusta",
            family_name="Byron",
            plan="enterprise Augusta",
            locale="en-GB",
            created_at=datetime(2026, 3, 1, tzinfo=UTC),
        ),
    )
    async with audit_service(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}", rabbitmq) as audit:
        await audit.publish(poisoned)
        await audit.recorder.wait_for_count("dead_lettered", 1)
        [announcement] = await announced_dead_letters(audit.app.state.bus.engine)
        await audit.recorder.wait_until_handled(announcement.id)
        [entry] = await audit.entries(type="message.dead_lettered", correlation_id=correlation_id)
        # the relay publishing it again (a crash before it marked the row): a duplicate
        await audit.publish(announcement)
        await audit.recorder.wait_until_handled(announcement.id, "duplicate")
        assert len(await audit.entries(type="message.dead_lettered")) == 1
        assert (await audit.verify())["ok"] is True
        dlq = audit.app.state.bus.names.service_queues("audit", 1).dlq
        [dead] = await read_queue(audit.rabbitmq_url, dlq)

    assert dead.reason == "schema_invalid"
    assert entry["event_id"] == announcement.id
    assert entry["type"] == "com.tributary.message.dead_lettered.v1"
    assert entry["source"] == "/services/audit"
    assert entry["causation_id"] == poisoned.id
    data = entry["data"]
    assert data["reason"] == "schema_invalid"
    assert (data["service"], data["consumer"]) == ("audit", "audit")
    assert (data["message_type"], data["message_id"]) == ("user.created.v2", poisoned.id)
    assert data["correlation_id"] == correlation_id
    assert data["attempts"] == 0
    assert data["error"].startswith("user.created.v2: data.plan: violates enum")
    recorded = json.dumps(entry)
    assert not [p for p in PERSONAL if p in recorded], recorded
