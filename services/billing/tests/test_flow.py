"""The paid-plan flow end to end inside billing: subscribe (a checkout at a real provider), pay
at the provider, its signed webhook, the integration events, identity's activation, the read
models; a declined payment; a provider that is down. SQLite and PostgreSQL, real broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tributary.payment_provider.testing import free_port
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .harness import Stack, activated, billing_stack, new_user


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


async def status_of(stack: Stack, subscription_id: str) -> str:
    answer = await stack.client.get(f"/subscriptions/{subscription_id}")
    status: str = answer.json()["status"]
    return status


async def test_a_paid_checkout_emits_payment_succeeded_once_and_activation_makes_it_active(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(database_url, rabbitmq.url, tmp_path) as stack:
        user = new_user()
        created = await stack.subscribe(user, "pro")
        assert created["status"] == "pending_payment"
        assert (created["plan"], created["amount_cents"], created["currency"]) == (
            "pro",
            2900,
            "EUR",
        )
        assert created["user_id"] == user
        assert created["pay_url"].endswith(f"/checkouts/{created['checkout_id']}/pay")
        assert [s["type"] for s in created["history"]] == [
            "SubscriptionRequested",
            "CheckoutCreated",
        ]
        sub = created["id"]
        at_provider = (
            await stack.provider.client.get(f"/checkouts/{created['checkout_id']}")
        ).json()
        assert (at_provider["reference"], at_provider["amount_cents"]) == (sub, 2900)

        paid = await stack.provider.pay(created["checkout_id"], "succeed")
        assert paid.status_code == 200

        async def is_paid() -> bool:
            return await status_of(stack, sub) == "paid"

        await eventually(is_paid, what="the provider's webhook to make it paid")
        [(key, event)] = await stack.published(1)
        assert key == "payment.succeeded.v1"
        assert event["user_id"] == user
        assert (event["plan"], event["amount_cents"], event["currency"]) == ("pro", 2900, "EUR")
        assert event["provider_reference"] == paid.json()["payment_id"]
        payment_id = event["payment_id"]
        assert len(await stack.outbox("payment.succeeded.v1")) == 1

        # identity activates the plan: the subscription becomes active, once however delivered
        activation = activated(user, payment_id, "pro")
        await stack.deliver(activation, times=3)
        await stack.deliver(activated(user, payment_id, "pro"))  # announced again, another id
        shown = (await stack.client.get(f"/subscriptions/{sub}")).json()
        assert shown["status"] == "active"
        assert [s["type"] for s in shown["history"]] == [
            "SubscriptionRequested",
            "CheckoutCreated",
            "PaymentSucceeded",
            "ActivationTimeoutScheduled",
            "ActivationConfirmed",
        ]
        assert [s["version"] for s in shown["history"]] == [1, 2, 3, 4, 5]

        listed = await stack.client.get(
            "/subscriptions", params={"status": "active"}, headers=stack.tokens.member(user)
        )
        [row] = listed.json()["items"]
        assert (row["id"], row["user_id"], row["version"], row["payment_id"]) == (
            sub,
            user,
            5,
            payment_id,
        )
        revenue = (await stack.client.get("/revenue")).json()
        assert revenue["lines"] == [
            {
                "plan": "pro",
                "currency": "EUR",
                "payments": 1,
                "gross_cents": 2900,
                "refunds": 0,
                "refunded_cents": 0,
                "net_cents": 2900,
            }
        ]
        # a payment billing does not know is counted, not retried
        await stack.deliver(activated(user, "pay_unknown0000000000"))
        assert (
            await stack.metric(
                "tributary_billing_unmatched_messages_total",
                type="subscription.activated",
                reason="unknown_payment",
            )
            == 1.0
        )


async def test_a_declined_payment_emits_payment_failed_and_activates_nothing(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(database_url, rabbitmq.url, tmp_path) as stack:
        user = new_user()
        created = await stack.subscribe(user)
        await stack.provider.pay(created["checkout_id"], "decline", decline_reason="expired_card")

        async def failed() -> bool:
            return await status_of(stack, created["id"]) == "payment_failed"

        await eventually(failed, what="the decline's webhook")
        [(key, event)] = await stack.published(1)
        assert key == "payment.failed.v1"
        assert (event["user_id"], event["reason"], event["amount_cents"]) == (
            user,
            "expired_card",
            900,
        )
        assert await stack.outbox("payment.succeeded.v1") == []
        assert (await stack.client.get("/revenue")).json()["lines"] == []

        cancelled = await stack.client.post(
            f"/subscriptions/{created['id']}/cancel", headers=stack.tokens.member(user)
        )
        assert cancelled.json()["status"] == "cancelled"
        [(key, event)] = await stack.published(1)
        assert key == "subscription.cancelled.v1"
        assert (event["reason"], event["user_id"]) == ("cancelled_by_user", user)


async def test_a_provider_that_does_not_answer_leaves_the_subscription_checkout_failed(
    sqlite_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with billing_stack(sqlite_url, rabbitmq.url, tmp_path, provider_url=nowhere) as stack:
        user = new_user()
        answer = await stack.client.post(
            "/subscriptions", json={"plan": "starter"}, headers=stack.tokens.member(user)
        )
        body = problem(answer, 503)
        assert answer.headers["retry-after"] == "10"
        listed = await stack.client.get("/subscriptions", params={"user_id": user})
        [row] = listed.json()["items"]
        assert row["status"] == "checkout_failed"
        assert row["id"] in body["detail"]
