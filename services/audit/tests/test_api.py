from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tributary.audit.app import create_app
from tributary.audit.settings import Settings
from tributary.contracts.envelope import CloudEvent
from tributary.messaging.db import create_engine
from tributary.messaging.testing import (
    OutcomeRecorder,
    delete_prefixed,
    isolated_settings,
    publish_raw,
)
from tributary.service.testing import running
from tributary.testkit.infra import Found

from .test_handlers import user_created, user_created_v1, workspace_created

TEST_SIGNING_KEY = "dGVzdC1vbmx5LWF1ZGl0LWNoZWNrcG9pbnQta2V5ISE="
"""32 raw bytes, base64: a fixed Ed25519 key for tests (nothing is written under var/)."""

T1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
T2 = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
T3 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Audit:
    """The running audit service, as a test talks to it."""

    app: FastAPI
    client: httpx.AsyncClient
    recorder: OutcomeRecorder
    rabbitmq_url: str
    database_url: str

    async def publish(self, event: CloudEvent[Any]) -> None:
        names = self.app.state.bus.names
        await publish_raw(self.rabbitmq_url, names, event.routing_key, event.to_bytes())

    async def record(self, *events: CloudEvent[Any]) -> None:
        for event in events:
            await self.publish(event)
        for event in events:
            await self.recorder.wait_until_handled(event.id)

    async def entries(self, **params: Any) -> list[dict[str, Any]]:
        response = await self.client.get("/audit", params=params)
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["entries"]
        return found

    async def verify(self) -> dict[str, Any]:
        response = await self.client.get("/audit/verify")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def sql(self, statement: str) -> None:
        """Raw SQL on the service's database, as someone with database access would run it."""
        engine = create_engine(self.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(statement))
        finally:
            await engine.dispose()


@asynccontextmanager
async def audit_service(
    database_url: str, rabbitmq: Found, pii_key: str | None = None, **env: Any
) -> AsyncIterator[Audit]:
    """``env``: more settings by their names (AUDIT_CHECKPOINT_EVERY=2)."""
    messaging = isolated_settings(rabbitmq.url)
    settings = Settings.model_validate(
        {
            "AUDIT_DATABASE_URL": database_url,
            "AUDIT_PORT": 0,
            "AUDIT_PII_KEY": pii_key,
            "AUDIT_SIGNING_KEY": TEST_SIGNING_KEY,
            **env,
        }
    )
    app = create_app(settings, messaging)
    recorder = OutcomeRecorder()
    try:
        async with running(app) as client:
            app.state.bus.listeners.append(recorder)
            assert (await client.get("/health/ready")).json()["status"] == "ready"
            yield Audit(app, client, recorder, rabbitmq.url, database_url)
    finally:
        names = app.state.bus.names
        qs = names.service_queues("audit", len(messaging.retry_tiers))
        await delete_prefixed(rabbitmq.url, names, [qs.work, qs.dlq, *qs.retries])


def new_user_id() -> str:
    return f"usr_{uuid.uuid4().hex[:12]}"


@dataclass
class SignUp:
    """One sign-up's events, all under one correlation id."""

    correlation_id: str
    user_id: str
    v1: CloudEvent[Any]
    v2: CloudEvent[Any]
    workspace: CloudEvent[Any]


@pytest.fixture(scope="module")
async def audit(tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found) -> AsyncIterator[Audit]:
    path = tmp_path_factory.mktemp("audit") / "audit.db"
    async with audit_service(f"sqlite+aiosqlite:///{path}", rabbitmq) as service:
        yield service


@pytest.fixture(scope="module")
async def sign_up(audit: Audit) -> SignUp:
    corr, user_id = uuid.uuid4().hex, new_user_id()
    v2 = user_created(user_id, email="ada@example.com", correlation_id=corr, time=T2)
    recorded = SignUp(
        correlation_id=corr,
        user_id=user_id,
        v1=user_created_v1(user_id, correlation_id=corr, time=T1),
        v2=v2,
        workspace=workspace_created(user_id, correlation_id=corr, causation_id=v2.id, time=T3),
    )
    await audit.record(recorded.v1, recorded.v2, recorded.workspace)
    return recorded


async def test_events_of_several_types_are_recorded_with_pii_masked(
    audit: Audit, sign_up: SignUp
) -> None:
    response = await audit.client.get("/audit", params={"correlation_id": sign_up.correlation_id})
    assert "ada@example.com" not in response.text
    assert "grace@example.com" not in response.text
    v1, v2, workspace = response.json()["entries"]
    assert [v1["event_id"], v2["event_id"], workspace["event_id"]] == [
        sign_up.v1.id,
        sign_up.v2.id,
        sign_up.workspace.id,
    ]
    assert v1["type"] == "com.tributary.user.created.v1"
    assert v1["data"]["email"] == "g***@example.com"
    assert v2["type"] == "com.tributary.user.created.v2"
    assert v2["data"]["email"] == "a***@example.com"
    assert v2["data"]["given_name"] == "A***"
    assert workspace["type"] == "com.tributary.workspace.created.v1"
    assert workspace["data"]["name"] == "A***"
    assert workspace["causation_id"] == sign_up.v2.id
    assert workspace["source"] == "/services/onboarding"
    assert workspace["prev_hash"] == v2["hash"]


async def test_entries_can_be_filtered_by_routing_key_cloudevents_type_or_type_name(
    audit: Audit, sign_up: SignUp
) -> None:
    corr = sign_up.correlation_id

    async def ids(type_: str) -> list[str]:
        return [e["event_id"] for e in await audit.entries(type=type_, correlation_id=corr)]

    assert await ids("user.created.v1") == [sign_up.v1.id]
    assert await ids("com.tributary.user.created.v2") == [sign_up.v2.id]
    assert await ids("user.created") == [sign_up.v1.id, sign_up.v2.id]
    assert await ids("workspace.created.v1") == [sign_up.workspace.id]
    assert await ids("email.sent.v1") == []


async def test_entries_can_be_filtered_by_subject(audit: Audit, sign_up: SignUp) -> None:
    found = await audit.entries(subject=f"users/{sign_up.user_id}")
    assert [e["event_id"] for e in found] == [sign_up.v1.id, sign_up.v2.id]


async def test_entries_can_be_filtered_by_event_time(audit: Audit, sign_up: SignUp) -> None:
    corr = sign_up.correlation_id
    window = await audit.entries(
        correlation_id=corr, **{"from": T2.isoformat(), "to": T3.isoformat()}
    )
    assert [e["event_id"] for e in window] == [sign_up.v2.id]
    # the same instant written with another offset, and without one (taken as UTC)
    later = await audit.entries(correlation_id=corr, **{"from": "2026-03-01T12:00:00+01:00"})
    assert [e["event_id"] for e in later] == [sign_up.v2.id, sign_up.workspace.id]
    earlier = await audit.entries(correlation_id=corr, to="2026-03-01T11:00:00")
    assert [e["event_id"] for e in earlier] == [sign_up.v1.id]


async def test_pages_follow_each_other_through_the_next_cursor(
    audit: Audit, sign_up: SignUp
) -> None:
    corr = sign_up.correlation_id
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"correlation_id": corr, "limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        page = (await audit.client.get("/audit", params=params)).json()
        seen += [e["event_id"] for e in page["entries"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == 2
    assert seen == [sign_up.v1.id, sign_up.v2.id, sign_up.workspace.id]
    first = await audit.entries(correlation_id=corr, limit=1)
    after = await audit.entries(correlation_id=corr, after_seq=first[0]["seq"])
    assert [e["event_id"] for e in after] == [sign_up.v2.id, sign_up.workspace.id]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 501}, "limit"),
        ({"limit": 0}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "c2VxOjE", "after_seq": 1}, "cursor"),
        ({"after_seq": -1}, "after_seq"),
        ({"after_seq": 2**63}, "after_seq"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"}, "from"),
        ({"type": "no.such.type"}, "type"),
    ],
)
async def test_bad_query_parameters_are_rejected_naming_the_parameter(
    audit: Audit, params: dict[str, Any], field: str
) -> None:
    response = await audit.client.get("/audit", params=params)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    [error] = response.json()["errors"]
    assert error["field"] == f"query.{field}"


async def test_a_redelivered_event_is_recorded_once(audit: Audit) -> None:
    event = user_created(new_user_id())
    await audit.publish(event)
    await audit.publish(event)
    await audit.recorder.wait_until_handled(event.id)
    await audit.recorder.wait_until_handled(event.id, "duplicate")
    assert len(await audit.entries(subject=event.subject)) == 1


async def test_the_recorded_chain_verifies(audit: Audit, sign_up: SignUp) -> None:
    result = await audit.verify()
    everything = await audit.entries(limit=500)
    assert result == {"ok": True, "entries": len(everything), "head": everything[-1]["hash"]}


async def test_with_a_pii_key_emails_are_recorded_as_keyed_hashes(
    tmp_path: Path, rabbitmq: Found
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    async with audit_service(url, rabbitmq, pii_key="s3cret") as audit:
        event = user_created(new_user_id(), email="ada@example.com")
        await audit.record(event)
        [entry] = await audit.entries(subject=event.subject)
        assert entry["data"]["email"].startswith("hmac:")
        assert "example.com" not in str(entry)


async def test_on_sqlite_a_tampered_entry_is_detected_at_its_seq(
    tmp_path: Path, rabbitmq: Found
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    async with audit_service(url, rabbitmq) as audit:
        await audit.record(*(user_created(new_user_id()) for _ in range(3)))
        assert (await audit.verify())["ok"] is True
        with pytest.raises(DBAPIError, match="append-only"):
            await audit.sql("UPDATE audit_entries SET subject = 'users/x' WHERE seq = 2")
        with pytest.raises(DBAPIError, match="append-only"):
            await audit.sql("DELETE FROM audit_entries WHERE seq = 2")

        await audit.sql("DROP TRIGGER audit_entries_no_update")
        await audit.sql(
            """UPDATE audit_entries SET data = json_set(data, '$.plan', 'pro') WHERE seq = 2"""
        )

        result = await audit.verify()
        assert (result["ok"], result["broken_at"], result["entries"]) == (False, 2, 1)
        assert result["reason"] == "the entry's content does not match its hash"


async def test_on_postgres_the_log_is_append_only_and_tampering_is_detected(
    postgres_url: str, rabbitmq: Found
) -> None:
    async with audit_service(postgres_url, rabbitmq) as audit:
        corr, user_id = uuid.uuid4().hex, new_user_id()
        v1 = user_created_v1(user_id, correlation_id=corr, time=T1)
        v2 = user_created(user_id, correlation_id=corr, time=T2)
        workspace = workspace_created(user_id, correlation_id=corr, causation_id=v2.id, time=T3)
        await audit.record(v1, v2, workspace)
        await audit.publish(v2)
        await audit.recorder.wait_until_handled(v2.id, "duplicate")

        found = await audit.entries(type="user.created", **{"from": T2.isoformat()})
        assert [e["event_id"] for e in found] == [v2.id]
        assert found[0]["data"]["email"] == "a***@example.com"
        assert len(await audit.entries(correlation_id=corr)) == 3
        assert (await audit.verify())["ok"] is True

        with pytest.raises(DBAPIError, match="append-only: UPDATE rejected"):
            await audit.sql("UPDATE audit_entries SET subject = 'users/x' WHERE seq = 2")
        with pytest.raises(DBAPIError, match="append-only: DELETE rejected"):
            await audit.sql("DELETE FROM audit_entries WHERE seq = 2")
        with pytest.raises(DBAPIError, match="append-only: TRUNCATE rejected"):
            await audit.sql("TRUNCATE audit_entries")

        await audit.sql("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only")
        await audit.sql(
            """UPDATE audit_entries SET data = '{"email": "eve@example.com"}' WHERE seq = 2"""
        )

        assert await audit.verify() == {
            "ok": False,
            "entries": 1,
            "broken_at": 2,
            "reason": "the entry's content does not match its hash",
        }
