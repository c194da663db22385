"""A paid plan end to end, every service a real process (SQLite): identity, email, audit,
notification, billing and the payment provider, each service its own broker user with the
sender check on, the provider reached over HTTP and calling billing back with webhooks it signs.

One stack for the module (each test its own users): a payment activates the plan, mails the
receipt, tells the user in-app, and is one trace from the webhook on; a declined payment
activates nothing; the same webhook five times is one payment; 50 concurrent cancels lose
nothing and report their conflicts.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook

from tributary.testkit.infra import Found
from tributary.testkit.otlp import OtlpReceiver, ReceivedSpan
from tributary.testkit.waiting import wait_until

from .conftest import new_stack
from .stack import BILLING_SERVICES, PROVIDER, Stack, get_json

# slow: long and mostly waiting (faults, time windows, processes starting): `make test` runs it
# in its second pytest process, beside the rest of the suite
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def paid(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found
) -> Iterator[Stack]:
    """The six processes on SQLite with an OTLP receiver, shared by the module."""
    workdir = tmp_path_factory.mktemp("billing-stack")
    with (
        OtlpReceiver() as receiver,
        new_stack(request, "sqlite", workdir, rabbitmq.url, services=BILLING_SERVICES) as stack,
    ):
        stack.otlp = receiver
        stack.start(BILLING_SERVICES)
        yield stack


@dataclass(frozen=True)
class Member:
    """A signed-up user calling with a token of their own (self scopes only)."""

    user_id: str
    email: str
    headers: dict[str, str]


def sign_up(stack: Stack) -> Member:
    email = f"bea.{uuid.uuid4().hex[:10]}@example.com"
    body = {"email": email, "name": "Bea Schulz", "plan": "free", "locale": "en-GB"}
    with stack.client("identity") as admin:
        created = admin.post("/users", json=body)
        created.raise_for_status()
        user_id = created.json()["id"]
        key = admin.post(f"/users/{user_id}/api-keys", json={"name": "billing e2e"})
        key.raise_for_status()
    form = {"grant_type": "client_credentials", "client_secret": key.json()["secret"]}
    with stack.client("identity", admin=False) as client:
        answer = client.post("/oauth/token", data=form)
    answer.raise_for_status()
    assert "users:admin" not in answer.json()["scope"]
    return Member(user_id, email, {"Authorization": f"Bearer {answer.json()['access_token']}"})


def subscribe(stack: Stack, member: Member, plan: str = "pro") -> dict[str, Any]:
    with stack.client("billing", admin=False) as client:
        answer = client.post("/subscriptions", json={"plan": plan}, headers=member.headers)
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    assert (created["status"], created["user_id"], created["version"]) == (
        "pending_payment",
        member.user_id,
        2,
    )
    return created


def pay(subscription: dict[str, Any], outcome: str, **more: Any) -> dict[str, Any]:
    """The payer's action at the pay URL: no API key, the checkout id is the credential."""
    with httpx.Client(timeout=10) as payer:
        answer = payer.post(subscription["pay_url"], json={"outcome": outcome, **more})
    assert answer.status_code == 200, answer.text
    checkout: dict[str, Any] = answer.json()
    return checkout


def subscription_of(stack: Stack, member: Member, subscription_id: str) -> dict[str, Any]:
    with stack.client("billing", admin=False) as client:
        answer = client.get(f"/subscriptions/{subscription_id}", headers=member.headers)
    answer.raise_for_status()
    found: dict[str, Any] = answer.json()
    return found


def in_status(stack: Stack, member: Member, subscription_id: str, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        found = subscription_of(stack, member, subscription_id)
        return found if found["status"] == status else None

    return wait_until(reached, timeout=30, what=f"subscription {subscription_id} {status}")


def audit_entries(stack: Stack, **filters: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = get_json(stack, "audit", "/audit", **filters)["entries"]
    return entries


def counted(stack: Stack, metric: str, **labels: str) -> float:
    """A sample of billing's ``/metrics`` (0 when the labels were never counted)."""
    with stack.client("billing", admin=False) as client:
        text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def history(subscription: dict[str, Any]) -> list[tuple[int, str]]:
    return [(step["version"], step["type"]) for step in subscription["history"]]


def contiguous(subscription: dict[str, Any]) -> bool:
    versions = [version for version, _ in history(subscription)]
    return versions == list(range(1, subscription["version"] + 1))


def saga_of(stack: Stack, subscription_id: str) -> dict[str, Any]:
    """``GET /sagas/{id}`` (``sagas:read``: the owner's token, fetched while identity is up)."""
    with httpx.Client(base_url=stack.url("billing"), timeout=10) as client:
        answer = client.get(f"/sagas/{subscription_id}", headers=stack.admin_headers())
    answer.raise_for_status()
    found: dict[str, Any] = answer.json()
    return found


# -- (a) ---------------------------------------------------------------------------------------


def _spans(spans: list[ReceivedSpan], service: str, kind: str, name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service and s.kind == kind and s.name == name]


WEBHOOK_TRACE = [
    ("billing", "PRODUCER", "publish payment.succeeded.v1"),
    ("identity", "CONSUMER", "process payment.succeeded.v1"),
    ("audit", "CONSUMER", "process payment.succeeded.v1"),
    ("identity", "PRODUCER", "publish subscription.activated.v1"),
    ("email", "CONSUMER", "process subscription.activated.v1"),
    ("audit", "CONSUMER", "process subscription.activated.v1"),
    ("notification", "CONSUMER", "process subscription.activated.v1"),
    ("billing", "CONSUMER", "process subscription.activated.v1"),
]


def test_a_payment_activates_the_plan_mails_the_receipt_notifies_and_is_one_trace(
    paid: Stack,
) -> None:
    stack = paid
    member = sign_up(stack)
    # the email service knows her address (its welcome mail is out) before anything is paid:
    # its subscription.activated is then handled once, one span in the trace
    wait_until(lambda: stack.mail.to(member.email), what="the welcome mail")
    created = subscribe(stack, member)
    checkout = pay(created, "succeed")
    assert checkout["status"] == "paid"

    active = in_status(stack, member, created["id"], "active")
    assert history(active) == [
        (1, "SubscriptionRequested"),
        (2, "CheckoutCreated"),
        (3, "PaymentSucceeded"),
        (4, "ActivationTimeoutScheduled"),
        (5, "ActivationConfirmed"),
    ]
    saga = saga_of(stack, created["id"])
    assert (saga["state"], saga["pending_timeout"]) == ("completed", None)
    assert active["payment_id"] is not None
    assert get_json(stack, "identity", f"/users/{member.user_id}")["plan"] == "pro"

    def receipt() -> list[Any]:
        return [m for m in stack.mail.to(member.email) if "pro plan is active" in str(m["Subject"])]

    assert len(wait_until(receipt, what="the receipt email")) == 1

    def billing_notices() -> list[dict[str, Any]]:
        with stack.client("notification", admin=False) as client:
            page = client.get(f"/users/{member.user_id}/notifications", headers=member.headers)
        page.raise_for_status()
        return [n for n in page.json()["items"] if n["category"] == "billing"]

    [notice] = wait_until(billing_notices, what="the in-app notification")
    assert notice["title"] == "Your pro plan is active"

    # one trace from the provider's webhook on: its correlation id is the payment event's
    subject = f"subscriptions/{created['id']}"
    [payment] = wait_until(
        lambda: audit_entries(stack, type="payment.succeeded", subject=subject),
        what="the audited payment",
    )
    cid = payment["correlation_id"]
    assert cid

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.attributes.get("tributary.correlation_id") == cid]
        return all(_spans(mine, *wanted) for wanted in WEBHOOK_TRACE)

    assert stack.otlp is not None
    spans = stack.otlp.wait_for(complete, timeout=30)
    mine = [s for s in spans if s.attributes.get("tributary.correlation_id") == cid]
    [webhook] = [
        s
        for s in mine
        if (s.service, s.kind) == ("billing", "SERVER") and "/webhooks/payments" in s.name
    ]
    trace = webhook.trace_id
    assert {s.trace_id for s in mine} == {trace}, sorted({(s.service, s.name) for s in mine})
    by_id = {s.span_id: s for s in spans if s.trace_id == trace}

    def one(service: str, kind: str, name: str) -> ReceivedSpan:
        found = _spans(list(by_id.values()), service, kind, name)
        assert len(found) == 1, f"{service} {kind} {name}: {len(found)} in the trace"
        return found[0]

    def descends(span: ReceivedSpan, ancestor: ReceivedSpan) -> bool:
        parent = by_id.get(span.parent_span_id)
        for _ in range(20):
            if parent is None:
                return False
            if parent.span_id == ancestor.span_id:
                return True
            parent = by_id.get(parent.parent_span_id)
        return False

    published = one("billing", "PRODUCER", "publish payment.succeeded.v1")
    assert descends(published, webhook), "billing's publish does not continue the webhook"
    for service in ("identity", "audit"):
        assert one(service, "CONSUMER", "process payment.succeeded.v1").parent_span_id == (
            published.span_id
        )
    activated = one("identity", "PRODUCER", "publish subscription.activated.v1")
    assert descends(activated, one("identity", "CONSUMER", "process payment.succeeded.v1"))
    for service in ("email", "audit", "notification", "billing"):
        assert one(service, "CONSUMER", "process subscription.activated.v1").parent_span_id == (
            activated.span_id
        ), service
    # no PII in the spans
    assert all(member.email not in str(s.attributes) for s in spans)


# -- (b) ---------------------------------------------------------------------------------------


def test_a_declined_payment_fails_the_subscription_and_activates_nothing(paid: Stack) -> None:
    stack = paid
    member = sign_up(stack)
    created = subscribe(stack, member, plan="starter")
    checkout = pay(created, "decline", decline_reason="insufficient_funds")
    assert (checkout["status"], checkout["decline_reason"]) == ("declined", "insufficient_funds")

    failed = in_status(stack, member, created["id"], "payment_failed")
    assert [t for _, t in history(failed)] == [
        "SubscriptionRequested",
        "CheckoutCreated",
        "PaymentFailed",
    ]
    subject = f"subscriptions/{created['id']}"
    # payment.failed went out (audit recorded it), and nothing was paid or activated
    wait_until(
        lambda: audit_entries(stack, type="payment.failed", subject=subject),
        what="the audited payment.failed",
    )
    assert audit_entries(stack, type="payment.succeeded", subject=subject) == []
    assert (
        audit_entries(stack, type="subscription.activated", subject=f"users/{member.user_id}") == []
    )
    assert get_json(stack, "identity", f"/users/{member.user_id}")["plan"] == "free"
    with stack.client("billing", admin=False) as client:
        mine = client.get(
            "/subscriptions", params={"status": "payment_failed"}, headers=member.headers
        )
    assert [s["id"] for s in mine.json()["items"]] == [created["id"]]
    # the payer cannot try that checkout again
    with httpx.Client(timeout=10) as payer:
        again = payer.post(created["pay_url"], json={"outcome": "succeed"})
    assert again.status_code == 409


# -- (c) ---------------------------------------------------------------------------------------


def provider_webhook(stack: Stack, checkout_id: str, type_: str) -> tuple[str, str]:
    """The id and body of the webhook the provider sent about a checkout (its database)."""
    path = stack.database_urls[PROVIDER].removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT id, body FROM provider_webhook_messages WHERE type = ? AND body LIKE ?",
            (type_, f'%"checkout_id":"{checkout_id}"%'),
        ).fetchall()
    assert len(rows) == 1, rows
    return str(rows[0][0]), str(rows[0][1])


def test_the_same_webhook_five_times_is_one_payment_and_one_activation(paid: Stack) -> None:
    stack = paid
    member = sign_up(stack)
    created = subscribe(stack, member)
    pay(created, "succeed")
    active = in_status(stack, member, created["id"], "active")
    subject = f"subscriptions/{created['id']}"
    wait_until(
        lambda: audit_entries(stack, type="payment.succeeded", subject=subject),
        what="the audited payment",
    )

    # the provider's webhook again, five times at once: as its retries send it (same id and
    # body, signed anew with the shared secret)
    webhook_id, body = provider_webhook(stack, created["checkout_id"], "payment.succeeded")
    duplicates = counted(stack, "tributary_billing_webhooks_total", outcome="duplicate")

    def deliver(_: int) -> httpx.Response:
        at = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(stack.webhook_secret).sign(webhook_id, at, body),
        }
        with httpx.Client(base_url=stack.url("billing"), timeout=10) as client:
            return client.post("/webhooks/payments", content=body.encode(), headers=headers)

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(deliver, range(5)))
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"status": "duplicate"})] * 5
    assert counted(stack, "tributary_billing_webhooks_total", outcome="duplicate") == (
        duplicates + 5
    )

    # nothing appended, one payment event, one activation
    assert subscription_of(stack, member, created["id"])["version"] == active["version"]
    [_receipt] = wait_until(
        lambda: [m for m in stack.mail.to(member.email) if "plan is active" in str(m["Subject"])],
        what="the receipt",
    )
    user_subject = f"users/{member.user_id}"
    wait_until(
        lambda: audit_entries(stack, type="subscription.activated", subject=user_subject),
        what="the audited activation",
    )
    assert len(audit_entries(stack, type="payment.succeeded", subject=subject)) == 1
    assert len(audit_entries(stack, type="subscription.activated", subject=user_subject)) == 1
    with stack.provider_client() as provider:
        sent = [m for m in provider.get("/webhook-messages").json() if m["id"] == webhook_id]
    assert [(m["attempts"], m["last_status"]) for m in sent] == [(1, 200)]


# -- (d) ---------------------------------------------------------------------------------------


def test_fifty_concurrent_cancels_lose_no_update_and_report_their_conflicts(
    paid: Stack,
) -> None:
    stack = paid
    member = sign_up(stack)
    created = subscribe(stack, member)
    seen = created["version"]
    refused = counted(
        stack, "tributary_billing_concurrency_conflicts_total", command="cancel", outcome="refused"
    )

    def cancel(i: int) -> tuple[bool, int, dict[str, Any]]:
        conditional = i % 2 == 0  # half only in the version they saw, half whatever it is
        headers = {**member.headers, **({"If-Match": f'"{seen}"'} if conditional else {})}
        with httpx.Client(base_url=stack.url("billing"), timeout=30) as client:
            answer = client.post(f"/subscriptions/{created['id']}/cancel", headers=headers)
        return conditional, answer.status_code, answer.json()

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(cancel, range(50)))

    statuses = Counter(status for _, status, _ in results)
    assert set(statuses) <= {200, 409}, statuses
    assert statuses[200] >= 1
    # a conditional cancel succeeds at most once: every other one saw a version gone by
    assert sum(1 for conditional, status, _ in results if conditional and status == 200) <= 1
    for _, status, body in results:
        if status == 200:
            assert (body["status"], body["version"]) == ("cancelled", seen + 1)
    # the stream: one Cancelled, versions contiguous, every 409 counted as a refused conflict
    final = subscription_of(stack, member, created["id"])
    assert final["status"] == "cancelled"
    assert contiguous(final)
    assert [t for _, t in history(final)].count("Cancelled") == 1
    assert final["version"] == seen + 1
    assert (
        counted(
            stack,
            "tributary_billing_concurrency_conflicts_total",
            command="cancel",
            outcome="refused",
        )
        == refused + statuses[409]
    )
    with stack.provider_client() as provider:
        closed = provider.get(f"/checkouts/{created['checkout_id']}").json()
    assert closed["status"] == "expired"
    wait_until(
        lambda: audit_entries(
            stack, type="subscription.cancelled", subject=f"subscriptions/{created['id']}"
        ),
        what="the audited cancellation",
    )
    assert (
        len(
            audit_entries(
                stack, type="subscription.cancelled", subject=f"subscriptions/{created['id']}"
            )
        )
        == 1
    )


# -- compensation --------------------------------------------------------------------------


def test_identity_down_past_the_activation_timeout_is_refunded_and_cancelled(
    paid: Stack,
) -> None:
    stack = paid
    member = sign_up(stack)
    wait_until(lambda: stack.mail.to(member.email), what="the welcome mail")
    created = subscribe(stack, member)
    stack.admin_token()  # a token for GET /sagas while identity is down (billing has its keys)
    identity = stack.services["identity"]
    identity.stop()
    try:
        checkout = pay(created, "succeed")

        def awaiting() -> dict[str, Any] | None:
            saga = saga_of(stack, created["id"])
            return saga if saga["state"] == "awaiting_activation" else None

        waiting = wait_until(awaiting, what="the paid saga awaiting its activation")
        assert waiting["pending_timeout"]["step"] == "activation_timeout"

        # nobody activates it: past the timeout the saga refunds at the provider, and the
        # provider's payment.refunded webhook ends it
        def compensated() -> dict[str, Any] | None:
            saga = saga_of(stack, created["id"])
            return saga if saga["state"] == "compensated" else None

        saga = wait_until(
            compensated, timeout=stack.activation_timeout + 30, what="the compensated saga"
        )
        assert saga["reason"] == "activation_timeout"
        with stack.provider_client() as provider:
            payment = provider.get(f"/payments/{checkout['payment_id']}").json()
        assert (payment["status"], payment["refunded_cents"]) == ("refunded", 2900)
        ended = subscription_of(stack, member, created["id"])
        assert ended["status"] == "refunded"
        assert ended["refunded_cents"] == 2900
        assert [t for _, t in history(ended)] == [
            "SubscriptionRequested",
            "CheckoutCreated",
            "PaymentSucceeded",
            "ActivationTimeoutScheduled",
            "CompensationStarted",
            "Refunded",
            "Cancelled",
        ]
        assert contiguous(ended)
        subject = f"subscriptions/{created['id']}"
        for type_ in ("payment.refunded", "subscription.cancelled"):
            [_entry] = wait_until(
                lambda t=type_: audit_entries(stack, type=t, subject=subject),
                what=f"the audited {type_}",
            )
    finally:
        stack.restart("identity")

    # identity, back, finds the payment and its cancellation queued: in either order the
    # payment's subscription ends cancelled there, and the user is on the free plan again
    def cancelled_in_identity() -> bool:
        path = stack.database_urls["identity"].removeprefix("sqlite+aiosqlite:///")
        with sqlite3.connect(path) as db:
            rows = db.execute(
                "SELECT status FROM subscriptions WHERE payment_id = ?", (ended["payment_id"],)
            ).fetchall()
        return rows == [("cancelled",)]

    wait_until(cancelled_in_identity, what="identity's subscription cancelled")
    assert get_json(stack, "identity", f"/users/{member.user_id}")["plan"] == "free"
    # a late activation, if identity made one first, changed nothing in billing
    assert saga_of(stack, created["id"])["state"] == "compensated"
    assert subscription_of(stack, member, created["id"])["status"] == "refunded"
