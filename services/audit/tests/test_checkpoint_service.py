"""Checkpoints from the running service: signed every N entries or T seconds, published
through the outbox to the real broker, checked by /audit/verify (PostgreSQL and SQLite)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tributary.contracts.audit_chain import checkpoint_message, unb64
from tributary.contracts.events import AuditCheckpointV1
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .test_api import Audit, audit_service, new_user_id
from .test_handlers import user_created


@asynccontextmanager
async def checkpoint_tap(audit: Audit) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A queue of the test's own bound to audit.checkpoint.v1, as a collector would bind one."""
    connection = await aio_pika.connect(audit.rabbitmq_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(audit.app.state.bus.names.exchange, ensure=False)
        queue = await channel.declare_queue(f"tap-{uuid.uuid4().hex}", exclusive=True)
        await queue.bind(exchange, "audit.checkpoint.v1")
        yield queue
    finally:
        await connection.close()


async def take(queue: aio_pika.abc.AbstractQueue, n: int, timeout: float = 15) -> list[Any]:
    found: list[Any] = []

    async def arrived() -> bool:
        while len(found) < n and (message := await queue.get(fail=False, no_ack=True)):
            found.append(json.loads(message.body))
        return len(found) >= n

    await eventually(arrived, timeout=timeout, what=f"{n} checkpoints")
    return found


async def test_checkpoints_are_signed_every_n_entries_published_and_checked(
    postgres_url: str, rabbitmq: Found
) -> None:
    async with audit_service(postgres_url, rabbitmq, AUDIT_CHECKPOINT_EVERY=2) as audit:
        async with checkpoint_tap(audit) as tap:
            await audit.record(*(user_created(new_user_id()) for _ in range(5)))
            events = await take(tap, 2)
        assert [e["type"] for e in events] == ["com.tributary.audit.checkpoint.v1"] * 2
        assert [e["data"]["seq"] for e in events] == [2, 4]
        assert "example.com" not in json.dumps(events)
        key = (await audit.client.get("/audit/checkpoints/key")).json()
        for event in events:
            data = AuditCheckpointV1.model_validate(event["data"])
            assert (data.key_id, data.public_key) == (key["key_id"], key["public_key"])
            Ed25519PublicKey.from_public_bytes(unb64(key["public_key"])).verify(
                unb64(data.signature), checkpoint_message(data.seq, data.head, data.signed_at)
            )
        listed = (await audit.client.get("/audit/checkpoints")).json()["checkpoints"]
        assert [c["seq"] for c in listed] == [4, 2]
        entries = await audit.entries()
        assert listed[0]["head"] == entries[3]["hash"]

        result = await audit.verify()
        assert result["ok"] is True
        assert result["entries"] == 5
        assert result["checkpoint"] == {"seq": 4, "head": entries[3]["hash"]}

        # a superuser deletes the newest entries behind the triggers' back
        await audit.sql("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only")
        await audit.sql("DELETE FROM audit_entries WHERE seq >= 3")
        cut = await audit.verify()
        assert (cut["ok"], cut["broken_at"], cut["entries"]) == (False, 3, 2)
        assert "cut short" in cut["reason"]
        full = (await audit.client.get("/audit/verify", params={"full": "true"})).json()
        assert (full["ok"], full["broken_at"]) == (False, 3)


async def test_a_checkpoint_is_signed_after_t_seconds_when_the_head_moved(
    tmp_path: Path, rabbitmq: Found
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    async with audit_service(
        url, rabbitmq, AUDIT_CHECKPOINT_EVERY=1000, AUDIT_CHECKPOINT_SECONDS=0.1
    ) as audit:
        await audit.record(user_created(new_user_id()))
        listed: list[dict[str, Any]] = []

        async def signed() -> bool:
            listed[:] = (await audit.client.get("/audit/checkpoints")).json()["checkpoints"]
            return bool(listed)

        await eventually(signed, timeout=10, what="a checkpoint after T seconds")
        assert [c["seq"] for c in listed] == [1]
