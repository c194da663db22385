"""The sign-up flow across identity, onboarding, email and audit, as real processes."""

from __future__ import annotations

import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tributary.contracts.envelope import new_event
from tributary.contracts.events import UserCreatedV1, UserCreatedV2
from tributary.testkit.waiting import wait_until

from .stack import Stack, get_json

# slow: a long end-to-end run of real processes: `make test` runs it in its second pytest process,
# beside the rest of the suite
pytestmark = pytest.mark.slow


def sign_up(stack: Stack, email: str, *, correlation_id: str | None = None) -> httpx.Response:
    headers = {"X-Correlation-ID": correlation_id} if correlation_id else {}
    with stack.client("identity") as client:
        return client.post(
            "/users",
            json={"email": email, "name": "Ada Lovelace", "plan": "free", "locale": "en-GB"},
            headers=headers,
        )


def unique_email() -> str:
    return f"ada.{uuid.uuid4().hex[:10]}@example.com"


def masked(email: str) -> str:
    local, _, domain = email.partition("@")
    return f"{local[0]}***@{domain}"


def workspaces(stack: Stack, owner_id: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = get_json(stack, "onboarding", "/workspaces", owner_id=owner_id)
    return result


def audit(stack: Stack, **filters: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = get_json(stack, "audit", "/audit", **filters)["entries"]
    return entries


def audit_types(stack: Stack, **filters: str) -> list[str]:
    return sorted(e["type"] for e in audit(stack, **filters))


def user_created_v1(user_id: str, email: str) -> Any:
    return new_event(
        routing_key="user.created.v1",
        source="/services/identity",
        subject=f"users/{user_id}",
        idempotencykey=f"user.created:{user_id}",
        data=UserCreatedV1(
            user_id=user_id,
            email=email,
            name="Ada Lovelace",
            plan="free",
            locale="en-GB",
            created_at=datetime.now(UTC),
        ),
    )


@pytest.mark.parametrize("stack", ["sqlite", "postgres"], indirect=True)
def test_a_sign_up_makes_one_workspace_one_welcome_email_and_masked_audit_entries(
    stack: Stack,
) -> None:
    stack.start()
    email = unique_email()
    cid = f"signup-{uuid.uuid4().hex[:8]}"
    response = sign_up(stack, email, correlation_id=cid)
    assert response.status_code == 201, response.text
    user_id = response.json()["id"]
    assert response.headers["x-correlation-id"] == cid

    [workspace] = wait_until(lambda: workspaces(stack, user_id), what="the workspace")
    [mail] = wait_until(lambda: stack.mail.to(email), what="the welcome email")
    assert mail["Message-ID"]
    wait_until(
        lambda: (
            {"com.tributary.user.created.v1", "com.tributary.workspace.created.v1"}
            <= set(audit_types(stack, correlation_id=cid))
        ),
        what="audit entries of user.created and workspace.created",
    )
    [created] = audit(stack, correlation_id=cid, type="user.created")
    assert created["data"]["email"] == masked(email)
    assert created["subject"] == f"users/{user_id}"
    [ws_entry] = audit(stack, correlation_id=cid, type="workspace.created")
    assert ws_entry["data"]["workspace_id"] == workspace["id"]
    assert get_json(stack, "audit", "/audit/verify")["ok"] is True
    assert len(stack.mail.to(email)) == 1


def test_the_same_sign_up_event_delivered_five_times_has_one_effect_each(
    shared_stack: Stack,
) -> None:
    stack = shared_stack
    email = unique_email()
    user_id = f"usr_{uuid.uuid4().hex[:20]}"
    event = user_created_v1(user_id, email)
    stack.publish("user.created.v1", event.to_bytes(), times=5)

    wait_until(lambda: workspaces(stack, user_id), what="the workspace")
    wait_until(lambda: stack.mail.to(email), what="the welcome email")
    wait_until(lambda: audit(stack, subject=f"users/{user_id}"), what="the audit entry")
    # a barrier: a later sign-up fully handled means the five copies were all handled before
    barrier = unique_email()
    barrier_id = sign_up(stack, barrier).json()["id"]
    wait_until(lambda: workspaces(stack, barrier_id) and stack.mail.to(barrier), what="barrier")
    wait_until(lambda: audit(stack, subject=f"users/{barrier_id}"), what="barrier audit")

    assert len(workspaces(stack, user_id)) == 1
    assert len(stack.mail.to(email)) == 1
    assert len(audit(stack, subject=f"users/{user_id}")) == 1


def test_a_foreign_producer_is_consumed_like_identity(shared_stack: Stack) -> None:
    stack = shared_stack
    email = unique_email()
    user_id = f"usr_{uuid.uuid4().hex[:20]}"
    event = new_event(
        routing_key="user.created.v2",
        source="/partners/crm",
        subject=f"users/{user_id}",
        correlationid=f"foreign-{user_id}",
        data=UserCreatedV2(
            user_id=user_id,
            email=email,
            given_name="Grace",
            family_name="Hopper",
            plan="pro",
            locale="en-US",
            created_at=datetime.now(UTC),
        ),
    )
    stack.publish("user.created.v2", event.to_bytes())

    wait_until(lambda: workspaces(stack, user_id), what="the workspace")
    [mail] = wait_until(lambda: stack.mail.to(email), what="the welcome email")
    assert "Grace" in mail.get_payload()
    wait_until(
        lambda: (
            "com.tributary.workspace.created.v1"
            in audit_types(stack, correlation_id=f"foreign-{user_id}")
        ),
        what="audit of the chain the foreign event started",
    )


def test_invalid_sign_ups_are_refused_with_a_reason_and_emit_nothing(shared_stack: Stack) -> None:
    stack = shared_stack
    run = uuid.uuid4().hex[:8]
    ok, bad_1, dup_1, bad_2 = (f"{name}-{run}" for name in ("ok", "bad-1", "dup-1", "bad-2"))
    taken = unique_email()
    assert sign_up(stack, taken, correlation_id=ok).status_code == 201

    bad = sign_up(stack, "not-an-email", correlation_id=bad_1)
    assert bad.status_code == 422
    assert "email" in bad.text
    dup = sign_up(stack, taken.upper(), correlation_id=dup_1)
    assert dup.status_code == 409
    assert "email" in dup.text
    with stack.client("identity") as client:
        missing = client.post(
            "/users", json={"email": unique_email()}, headers={"X-Correlation-ID": bad_2}
        )
    assert missing.status_code == 422

    # barrier: the valid sign-up's events are all audited; nothing exists for the refused ones
    wait_until(
        lambda: "com.tributary.workspace.created.v1" in audit_types(stack, correlation_id=ok),
        what="the valid sign-up fully handled",
    )
    barrier = unique_email()
    barrier_id = sign_up(stack, barrier).json()["id"]
    wait_until(lambda: audit(stack, subject=f"users/{barrier_id}"), what="barrier audit")
    for cid in (bad_1, dup_1, bad_2):
        assert audit(stack, correlation_id=cid) == []
    assert len(stack.mail.to(taken)) == 1


def test_mail_sent_while_smtp_is_down_arrives_once_when_it_is_back(stack: Stack) -> None:
    stack.mail.stop()
    stack.start()
    email = unique_email()
    user_id = sign_up(stack, email).json()["id"]
    wait_until(lambda: workspaces(stack, user_id), what="the workspace (not held up by SMTP)")

    def retried() -> bool:
        with stack.client("email") as client:
            text = client.get("/metrics").text
        return any(
            line.startswith("tributary_events_consumed_total")
            and 'outcome="retried"' in line
            and not line.endswith(" 0.0")
            for line in text.splitlines()
        )

    wait_until(retried, what="the email service retrying the send")
    assert stack.mail.messages == []
    stack.mail.start()
    wait_until(lambda: stack.mail.to(email), timeout=45, what="the mail after SMTP is back")
    sent = wait_until(
        lambda: [e for e in get_json(stack, "email", "/emails", to=email) if e["status"] == "sent"],
        what="the email recorded as sent",
    )
    assert len(sent) == 1
    assert len(stack.mail.to(email)) == 1


def test_the_audit_chain_verifies_and_a_tampered_entry_is_found(stack: Stack) -> None:
    stack.start()
    for _ in range(3):
        sign_up(stack, unique_email())
    wait_until(lambda: len(audit(stack)) >= 6, what="audit entries")
    assert get_json(stack, "audit", "/audit/verify")["ok"] is True
    target = audit(stack)[2]["seq"]

    path = stack.database_urls["audit"].removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(path) as db:
        triggers = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
        for name in triggers:  # an attacker with file access; the service itself cannot
            db.execute(f'DROP TRIGGER "{name}"')
        db.execute(
            "UPDATE audit_entries SET subject = 'users/usr_forged0000' WHERE seq = ?", (target,)
        )

    report = get_json(stack, "audit", "/audit/verify")
    assert report["ok"] is False
    assert report["broken_at"] == target


def test_killing_onboarding_mid_stream_still_makes_exactly_one_workspace_per_user(
    stack: Stack,
) -> None:
    stack.start()
    emails = [unique_email() for _ in range(200)]

    def create(email: str) -> str:
        # a 503 (identity's signing keys not loaded yet, on a busy machine) made nothing: retry
        response = wait_until(
            lambda: (r := sign_up(stack, email)).status_code != 503 and r, what="identity ready"
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(create, e) for e in emails]
        # kill onboarding while sign-ups are still being made and handled
        wait_until(lambda: sum(f.done() for f in futures) >= 40, what="some sign-ups")
        stack.services["onboarding"].kill()
        user_ids = [f.result() for f in futures]
    stack.restart("onboarding")

    def all_have_one() -> bool:
        return all(len(workspaces(stack, uid)) == 1 for uid in user_ids)

    wait_until(all_have_one, timeout=120, what="one workspace per user")
    with stack.client("onboarding") as client:
        counts = [len(client.get("/workspaces", params={"owner_id": u}).json()) for u in user_ids]
    assert counts == [1] * 200
