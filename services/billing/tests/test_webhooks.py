"""The webhook endpoint: deduplication by webhook id, every refusal with its status and its
count, secret rotation, and 50 webhooks of one subscription at once (no lost update)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlmodel import select

from tributary.payment_provider.models import WebhookMessage
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .harness import Stack, billing_stack, new_user, notice, signed

OTHER_SECRET = "whsec_b3RoZXItc2VjcmV0LW9mLTMyLWJ5dGVzLWZvci10ZXN0cw=="


async def paid(stack: Stack, user: str) -> tuple[dict[str, Any], WebhookMessage]:
    """A subscription paid at the provider, and the webhook the provider delivered for it."""
    created = await stack.subscribe(user)
    await stack.provider.pay(created["checkout_id"], "succeed")

    async def delivered() -> list[WebhookMessage]:
        async with stack.provider.sessions() as session:
            rows = await session.exec(select(WebhookMessage))
            return [m for m in rows.all() if m.delivered_at is not None]

    async def any_delivered() -> bool:
        return bool(await delivered())

    await eventually(any_delivered, what="the provider's webhook delivered")
    [message] = await delivered()
    return created, message


async def test_the_same_webhook_five_times_makes_one_payment(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(database_url, rabbitmq.url, tmp_path) as stack:
        user = new_user()
        created, message = await paid(stack, user)
        # the provider retrying: the same id and body, signed anew each time; at once and after
        body = message.body.encode()
        answers = await asyncio.gather(
            *(stack.webhook(body, webhook_id=message.id) for _ in range(3))
        )
        answers += [await stack.webhook(body, webhook_id=message.id) for _ in range(2)]
        assert [a.status_code for a in answers] == [200] * 5
        assert {a.json()["status"] for a in answers} == {"duplicate"}
        # the same payment announced under another webhook id changes nothing either
        again = await stack.webhook(body)
        assert again.json() == {"status": "no_change"}

        stream = await stack.stream(created["id"])
        assert [e.type for e in stream].count("PaymentSucceeded") == 1
        assert len(await stack.outbox("payment.succeeded.v1")) == 1
        assert await stack.metric("tributary_billing_webhooks_total", outcome="accepted") == 1
        assert await stack.metric("tributary_billing_webhooks_total", outcome="duplicate") == 5
        revenue = (await stack.client.get("/revenue")).json()["lines"]
        assert [(line["payments"], line["gross_cents"]) for line in revenue] == [(1, 900)]


async def test_forged_stale_oversized_and_replayed_webhooks_are_refused_and_counted(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(database_url, rabbitmq.url, tmp_path) as stack:
        user = new_user()
        created = await stack.subscribe(user)
        good = notice(
            "payment.succeeded",
            {
                "checkout_id": created["checkout_id"],
                "reference": created["id"],
                "amount_cents": 900,
                "currency": "EUR",
                "payment_id": "pi_forgedforgedforged",
                "paid_at": datetime.now(UTC).isoformat(),
                "metadata": {},
            },
        )
        long_ago = datetime.now(UTC) - timedelta(minutes=6)
        ahead = datetime.now(UTC) + timedelta(minutes=6)
        headers = signed(good)
        tampered = good.replace(b'"amount_cents": 900', b'"amount_cents": 901')
        cases: list[tuple[str, int, bytes, dict[str, str]]] = [
            ("forged", 401, good, signed(good, secret=OTHER_SECRET)),
            ("forged", 401, tampered, headers),
            ("forged", 401, good, {**headers, "webhook-signature": "v1,AAAA v2,xyz nonsense"}),
            ("forged", 401, good, {**headers, "webhook-id": "msg_other"}),
            ("stale", 400, good, signed(good, at=long_ago)),
            ("stale", 400, good, signed(good, at=ahead)),
            ("unsigned", 401, good, {"content-type": "application/json"}),
            ("malformed", 400, good, {**headers, "webhook-timestamp": "yesterday"}),
            ("oversized", 413, b"{" + b" " * 17_000 + b"}", signed(b"{}")),
            ("oversized", 413, b"x" * 70_000, signed(b"{}")),  # over the service-wide limit
            ("invalid_payload", 400, b"[1, 2", signed(b"[1, 2")),
            ("invalid_payload", 400, b'{"type": "payment.succeeded"}', {}),
        ]
        for outcome, status, body, given in cases:
            if not given:
                given = signed(body)
            answer = await stack.webhook(body, headers=given)
            assert answer.status_code == status, (outcome, answer.text)
            assert answer.headers["content-type"].startswith("application/problem+json")
            if status == 401:
                assert answer.headers["www-authenticate"].startswith("Webhook-Signature")

        # the first delivery applies it; a replay with another body is refused
        first = await stack.webhook(good, headers=headers)
        assert first.json() == {"status": "accepted"}
        replay = await stack.webhook(
            tampered, headers={**signed(tampered, webhook_id=headers["webhook-id"])}
        )
        assert replay.status_code == 409
        # an unknown event type is acknowledged and ignored; a notice for nobody, unmatched
        other = notice("payment.disputed", {"whatever": 1})
        assert (await stack.webhook(other)).json() == {"status": "ignored"}
        nobody = json.loads(good)
        nobody["data"]["reference"] = "sub_doesnotexist00"
        assert (await stack.webhook(json.dumps(nobody).encode())).json() == {"status": "unmatched"}

        # nothing but the one accepted webhook changed anything
        assert [e.type for e in await stack.stream(created["id"])].count("PaymentSucceeded") == 1
        assert len(await stack.outbox("payment.succeeded.v1")) == 1
        expected = {
            "forged": 4,
            "stale": 2,
            "unsigned": 1,
            "malformed": 1,
            "oversized": 2,
            "invalid_payload": 2,
            "replay_conflict": 1,
            "accepted": 1,
            "ignored": 1,
            "unmatched": 1,
        }
        for outcome, count in expected.items():
            found = await stack.metric("tributary_billing_webhooks_total", outcome=outcome)
            assert found == count, outcome


async def test_webhooks_signed_with_any_active_secret_are_accepted(
    sqlite_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    rotation: dict[str, Any] = {"BILLING_WEBHOOK_SECRETS": [OTHER_SECRET, "whsec_" + "QUJD" * 8]}
    async with billing_stack(sqlite_url, rabbitmq.url, tmp_path, **rotation) as stack:
        body = notice("payment.disputed", {})
        for secret in rotation["BILLING_WEBHOOK_SECRETS"]:
            assert (await stack.webhook(body, secret=secret)).status_code == 200
        # the provider's (test) secret is not among them any more
        assert (await stack.webhook(body)).status_code == 401


async def test_fifty_refunds_of_one_subscription_at_once_lose_no_update(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(database_url, rabbitmq.url, tmp_path) as stack:
        user = new_user()
        created, message = await paid(stack, user)
        payment = json.loads(message.body)["data"]["payment_id"]
        bodies = [
            notice(
                "payment.refunded",
                {
                    "checkout_id": created["checkout_id"],
                    "reference": created["id"],
                    "payment_id": payment,
                    "refund_id": f"re_{uuid.uuid4().hex[:20]}",
                    "amount_cents": 1,
                    "currency": "EUR",
                    "refunded_at": datetime.now(UTC).isoformat(),
                    "metadata": {},
                },
            )
            for _ in range(50)
        ]
        ids = [f"msg_{uuid.uuid4().hex}" for _ in bodies]
        answers = await asyncio.gather(
            *(stack.webhook(body, webhook_id=i) for body, i in zip(bodies, ids, strict=True))
        )
        refused = [n for n, a in enumerate(answers) if a.status_code != 200]
        assert {a.json()["status"] for a in answers} == {"accepted"}

        stream = await stack.stream(created["id"])
        assert [e.version for e in stream] == list(range(1, len(stream) + 1))  # contiguous
        refunds = [e for e in stream if e.type == "Refunded"]
        assert len(refunds) == 50
        assert len({e.data["refund_id"] for e in refunds}) == 50
        shown = (await stack.client.get(f"/subscriptions/{created['id']}")).json()
        assert (shown["refunded_cents"], shown["version"]) == (50, len(stream))
        assert len(await stack.outbox("payment.refunded.v1")) == 50
        revenue = (await stack.client.get("/revenue")).json()["lines"]
        assert [(line["refunds"], line["refunded_cents"]) for line in revenue] == [(50, 50)]
        # the conflicts happened and were reported; each was retried in turn, none refused
        retried = await stack.metric(
            "tributary_billing_concurrency_conflicts_total", command="webhook", outcome="retried"
        )
        refused_count = await stack.metric(
            "tributary_billing_concurrency_conflicts_total", command="webhook", outcome="refused"
        )
        assert (refused_count, len(refused)) == (0, 0)
        assert retried > 0
