"""Checkouts, payments (succeed, decline, delay), refunds and expiry, through real HTTP on
SQLite and PostgreSQL; every webhook verified by a receiver with the standardwebhooks package."""

from __future__ import annotations

import asyncio
from typing import Any

from tributary.payment_provider.testing import WebhookReceiver, running_provider


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


async def test_a_checkout_paid_sends_one_signed_payment_succeeded(
    database_url: str, receiver: WebhookReceiver
) -> None:
    async with running_provider(database_url, receiver.url) as provider:
        body = {
            "amount_cents": 2900,
            "currency": "EUR",
            "reference": "sub_0123456789",
            "metadata": {"plan": "pro"},
        }
        created = await provider.client.post(
            "/checkouts", json=body, headers={"Idempotency-Key": "sub_0123456789"}
        )
        assert created.status_code == 201, created.text
        checkout = created.json()
        assert checkout["status"] == "open"
        assert checkout["pay_url"] == f"http://127.0.0.1:8007/checkouts/{checkout['id']}/pay"
        again = await provider.client.post(
            "/checkouts", json=body, headers={"Idempotency-Key": "sub_0123456789"}
        )
        assert again.json()["id"] == checkout["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        other = {**body, "amount_cents": 1}
        problem(
            await provider.client.post(
                "/checkouts", json=other, headers={"Idempotency-Key": "sub_0123456789"}
            ),
            409,
        )

        paid = await provider.pay(checkout["id"], "succeed")
        assert paid.status_code == 200, paid.text
        assert paid.json()["status"] == "paid"
        payment_id = paid.json()["payment_id"]
        [hook] = await receiver.wait(1)
        assert hook.verified
        assert hook.id.startswith("msg_")
        assert hook.body["type"] == "payment.succeeded"
        assert hook.body["data"] == {
            "checkout_id": checkout["id"],
            "payment_id": payment_id,
            "amount_cents": 2900,
            "currency": "EUR",
            "reference": "sub_0123456789",
            "metadata": {"plan": "pro"},
            "paid_at": hook.body["data"]["paid_at"],
        }
        payment = (await provider.client.get(f"/payments/{payment_id}")).json()
        assert payment["status"] == "succeeded"
        assert payment["amount_cents"] == 2900

        problem(await provider.pay(checkout["id"], "succeed"), 409)  # paid once only
        problem(await provider.client.post(f"/checkouts/{checkout['id']}/expire"), 409)
        messages = (await provider.client.get("/webhook-messages")).json()
        assert [m["delivered_at"] is not None for m in messages] == [True]
        assert len(receiver.requests) == 1


async def test_a_declined_checkout_sends_payment_failed_and_cannot_be_paid_after(
    database_url: str, receiver: WebhookReceiver
) -> None:
    async with running_provider(database_url, receiver.url) as provider:
        checkout = await provider.checkout(900, "sub_declined01")
        declined = await provider.pay(
            checkout["id"], "decline", decline_reason="insufficient_funds"
        )
        assert declined.json()["status"] == "declined"
        [hook] = await receiver.wait(1)
        assert hook.verified
        assert hook.body["type"] == "payment.failed"
        assert hook.body["data"]["reason"] == "insufficient_funds"
        assert hook.body["data"]["reference"] == "sub_declined01"
        assert "payment_id" not in hook.body["data"]
        problem(await provider.pay(checkout["id"], "succeed"), 409)
        expired = await provider.client.post(f"/checkouts/{checkout['id']}/expire")
        assert expired.json()["status"] == "declined"  # left as it is


async def test_a_delayed_payment_succeeds_after_its_delay(
    database_url: str, receiver: WebhookReceiver
) -> None:
    async with running_provider(database_url, receiver.url) as provider:
        checkout = await provider.checkout(900, "sub_delayed001")
        processing = await provider.pay(checkout["id"], "delay", delay_seconds=0.5)
        assert processing.json()["status"] == "processing"
        assert processing.json()["payment_id"] is None
        problem(await provider.pay(checkout["id"], "succeed"), 409)
        [hook] = await receiver.wait(1)
        assert hook.body["type"] == "payment.succeeded"
        settled = (await provider.client.get(f"/checkouts/{checkout['id']}")).json()
        assert settled["status"] == "paid"
        assert settled["payment_id"] == hook.body["data"]["payment_id"]
        paid_at = hook.body["data"]["paid_at"]
        assert paid_at >= processing.json()["settle_at"].replace("+00:00", "Z")[:19]


async def test_refunds_in_parts_never_exceed_the_payment_and_each_sends_a_webhook(
    database_url: str, receiver: WebhookReceiver
) -> None:
    async with running_provider(database_url, receiver.url) as provider:
        checkout = await provider.checkout(1000, "sub_refunded01")
        payment_id = (await provider.pay(checkout["id"], "succeed")).json()["payment_id"]
        url = f"/payments/{payment_id}/refunds"
        part = await provider.client.post(
            url, json={"amount_cents": 300, "reason": "goodwill"}, headers={"Idempotency-Key": "r1"}
        )
        assert part.status_code == 201, part.text
        replay = await provider.client.post(
            url, json={"amount_cents": 300, "reason": "goodwill"}, headers={"Idempotency-Key": "r1"}
        )
        assert replay.json()["id"] == part.json()["id"]
        assert replay.headers["Idempotent-Replayed"] == "true"
        # five refunds of 200 at once: only what is left (700) can be refunded
        answers = await asyncio.gather(
            *(provider.client.post(url, json={"amount_cents": 200}) for _ in range(5))
        )
        assert sorted(a.status_code for a in answers) == [201, 201, 201, 409, 409]
        rest = await provider.client.post(url, json={})
        assert rest.json()["amount_cents"] == 100
        problem(await provider.client.post(url, json={}), 409)
        payment = (await provider.client.get(f"/payments/{payment_id}")).json()
        assert (payment["status"], payment["refunded_cents"]) == ("refunded", 1000)

        hooks = await receiver.wait(1 + 5)
        refunds = [h for h in hooks if h.body["type"] == "payment.refunded"]
        assert all(h.verified for h in hooks)
        assert sorted(h.body["data"]["amount_cents"] for h in refunds) == [100, 200, 200, 200, 300]
        assert [
            h.body["data"]["full"] for h in refunds if h.body["data"]["amount_cents"] == 100
        ] == [True]
        assert len({h.id for h in hooks}) == 6


async def test_an_open_checkout_expires_and_cannot_be_paid(
    database_url: str, receiver: WebhookReceiver
) -> None:
    async with running_provider(database_url, receiver.url) as provider:
        checkout = await provider.checkout()
        expired = await provider.client.post(f"/checkouts/{checkout['id']}/expire")
        assert expired.json()["status"] == "expired"
        problem(await provider.pay(checkout["id"], "succeed"), 409)
        problem(await provider.client.get("/checkouts/chk_absent"), 404)
        problem(await provider.pay("chk_absent", "succeed"), 404)
        assert receiver.requests == []
