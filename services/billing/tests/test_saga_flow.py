"""The saga end to end inside billing, on the real broker with a real payment provider (SQLite
and PostgreSQL): four paid subscriptions whose identity activates one (completed, its timeout
then does nothing), rejects one (compensated: refunded at the provider, payment.refunded and
subscription.cancelled), stays silent on one (the activation timeout, a scheduled outbox row,
compensates it) and leaves one whose payment the provider does not know (the refund is
refused: dead-lettered, the saga stays compensating and is listed as such). Steps delivered
again and racing the real ones refund once; late and unmatched messages are counted.

The activation timeout is 10 minutes here; a test makes a scheduled step due by moving its
outbox row's ``deliver_at`` to now (the clock jumping), which the relay honours within its
poll interval, so nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from tributary.billing.commands import payment_id_for
from tributary.contracts.envelope import CloudEvent, new_event, parse_event
from tributary.contracts.events import BillingSagaV1, SubscriptionActivationRejectedV1
from tributary.messaging.db import OutboxRow, as_utc, utcnow
from tributary.messaging.headers import REASON
from tributary.messaging.testing import read_queue
from tributary.payment_provider.models import Payment, Refund, WebhookMessage
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .harness import Stack, activated, billing_stack, new_user, notice

TIMEOUT = 600


def rejected(user_id: str, payment_id: str, reason: str = "already_subscribed") -> CloudEvent[Any]:
    return new_event(
        routing_key="subscription.activation_rejected.v1",
        source="/services/identity",
        data=SubscriptionActivationRejectedV1(
            payment_id=payment_id,
            user_id=user_id,
            plan="starter",
            reason=reason,  # type: ignore[arg-type]
            rejected_at=datetime.now(UTC),
        ),
    )


def step(kind: str, subscription_id: str) -> CloudEvent[Any]:
    """A saga step as billing sends it to itself (another copy of one: another event id)."""
    return new_event(
        routing_key="billing.saga.v1",
        source="/services/billing",
        data=BillingSagaV1(step=kind, subscription_id=subscription_id),  # type: ignore[arg-type]
        idempotencykey=f"billing.saga:{kind}:{subscription_id}:{uuid.uuid4().hex[:8]}",
    )


async def saga(stack: Stack, subscription_id: str) -> dict[str, Any]:
    answer = await stack.client.get(f"/sagas/{subscription_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def reaches(stack: Stack, subscription_id: str, state: str) -> None:
    async def there() -> bool:
        return (await saga(stack, subscription_id))["state"] == state

    await eventually(there, what=f"saga {subscription_id} {state}")


async def scheduled(stack: Stack, subscription_id: str) -> list[OutboxRow]:
    """The saga's steps of ``subscription_id`` still waiting in the outbox for their time."""
    async with stack.sessions() as session:
        rows = (
            await session.exec(
                select(OutboxRow).where(
                    col(OutboxRow.routing_key) == "billing.saga.v1",
                    col(OutboxRow.published_at).is_(None),
                    col(OutboxRow.deliver_at).is_not(None),
                )
            )
        ).all()
    return [r for r in rows if parse_event(r.body).data["subscription_id"] == subscription_id]


async def due_now(stack: Stack, subscription_id: str) -> list[str]:
    """The clock jumps: ``subscription_id``'s scheduled steps are due now (their event ids)."""
    rows = await scheduled(stack, subscription_id)
    async with stack.sessions() as session:
        for row in rows:
            row.deliver_at = utcnow()
            session.add(row)
        await session.commit()
    stack.app.state.bus.relay.notify()
    return [row.event_id for row in rows]


async def staged_step(stack: Stack, subscription_id: str, kind: str) -> str:
    """The event id of the ``kind`` step billing staged for ``subscription_id``."""
    async with stack.sessions() as session:
        rows = (
            await session.exec(
                select(OutboxRow).where(col(OutboxRow.routing_key) == "billing.saga.v1")
            )
        ).all()
    [found] = [
        r.event_id
        for r in rows
        if parse_event(r.body).data == {"step": kind, "subscription_id": subscription_id}
    ]
    return found


async def handled(stack: Stack, event_id: str, outcome: str = "processed") -> None:
    await stack.recorder.wait(
        lambda: any(r.outcome == outcome for r in stack.recorder.of(event_id)),
        what=f"{event_id} {outcome}",
    )


async def provider_refunds(stack: Stack, provider_payment_id: str) -> list[Refund]:
    async with stack.provider.sessions() as session:
        rows = await session.exec(
            select(Refund).where(col(Refund.payment_id) == provider_payment_id)
        )
        return list(rows.all())


async def types_of(stack: Stack, subscription_id: str) -> list[str]:
    stream = await stack.stream(subscription_id)
    assert [e.version for e in stream] == list(range(1, len(stream) + 1))
    return [e.type for e in stream]


async def test_the_saga_completes_or_compensates_through_the_real_provider(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(
        database_url, rabbitmq.url, tmp_path, BILLING_ACTIVATION_TIMEOUT_SECONDS=TIMEOUT
    ) as stack:
        users = {name: new_user() for name in "ABCD"}
        made = {name: await stack.subscribe(users[name]) for name in "ABCD"}
        ids = {name: made[name]["id"] for name in "ABCD"}
        payments = {name: payment_id_for(made[name]["checkout_id"]) for name in "ABCD"}
        for name in "ABC":
            assert (await stack.provider.pay(made[name]["checkout_id"], "succeed")).is_success
        # D: a payment the provider does not know (so it will refuse to refund it)
        paid_d = notice(
            "payment.succeeded",
            {
                "checkout_id": made["D"]["checkout_id"],
                "reference": ids["D"],
                "amount_cents": 900,
                "currency": "EUR",
                "payment_id": "pi_unknowntotheprovider",
                "paid_at": datetime.now(UTC).isoformat(),
            },
        )
        assert (await stack.webhook(paid_d)).json() == {"status": "accepted"}
        for name in "ABCD":
            await reaches(stack, ids[name], "awaiting_activation")
        assert sorted(k for k, _ in await stack.published(4)) == ["payment.succeeded.v1"] * 4

        # paid: waiting for identity, the timeout scheduled with the payment
        waiting = await saga(stack, ids["A"])
        due = datetime.fromisoformat(waiting["pending_timeout"]["due_at"])
        assert waiting["pending_timeout"]["step"] == "activation_timeout"
        left = (due - datetime.now(UTC)).total_seconds()
        assert TIMEOUT - 30 < left <= TIMEOUT
        assert (waiting["status"], waiting["reason"], waiting["version"]) == ("paid", None, 4)
        assert [(s["version"], s["type"]) for s in waiting["steps"]] == [
            (1, "SubscriptionRequested"),
            (2, "CheckoutCreated"),
            (3, "PaymentSucceeded"),
            (4, "ActivationTimeoutScheduled"),
        ]
        [row] = await scheduled(stack, ids["A"])
        assert row.deliver_at is not None
        assert abs((as_utc(row.deliver_at) - due).total_seconds()) < 1

        # C: identity activates the plan in time; the saga completes
        await stack.deliver(activated(users["C"], payments["C"]))
        await reaches(stack, ids["C"], "completed")

        # B: identity rejects it (a duplicate purchase); refund steps race the real one
        rejection = rejected(users["B"], payments["B"])
        await asyncio.gather(
            stack.deliver(rejection), *(stack.deliver(step("refund", ids["B"])) for _ in range(2))
        )
        await reaches(stack, ids["B"], "compensated")

        # A: nothing from identity; the timeout comes (twice: a copy races it), refund steps too
        [timeout_a] = await due_now(stack, ids["A"])
        await asyncio.gather(
            stack.deliver(step("activation_timeout", ids["A"])),
            *(stack.deliver(step("refund", ids["A"])) for _ in range(2)),
        )
        await handled(stack, timeout_a)
        await reaches(stack, ids["A"], "compensated")

        # C's timeout comes after its activation: nothing to do
        [timeout_c] = await due_now(stack, ids["C"])
        await handled(stack, timeout_c)
        assert (await saga(stack, ids["C"]))["state"] == "completed"

        # D: the provider refuses the refund: dead-lettered with the reason, D stays stuck
        [timeout_d] = await due_now(stack, ids["D"])
        await handled(stack, timeout_d)
        refund_d = await staged_step(stack, ids["D"], "refund")
        await handled(stack, refund_d, "dead_lettered")
        steps_queues = stack.names.command_queues("billing.saga", 2)
        [dead] = await read_queue(stack.broker_url, steps_queues.dlq, expect=1)
        assert dead.message_id == refund_d
        assert dead.headers[REASON] == "handler_error"
        stuck = await saga(stack, ids["D"])
        assert (stuck["state"], stuck["status"], stuck["reason"]) == (
            "compensating",
            "compensating",
            "activation_timeout",
        )

        # the money went back once each, at the provider, and billing said so once each
        for name, why, cancel_reason in (
            ("A", "activation_timeout", "activation_timeout"),
            ("B", "activation_rejected:already_subscribed", "activation_rejected"),
        ):
            shown = await saga(stack, ids[name])
            assert (shown["state"], shown["status"], shown["reason"]) == (
                "compensated",
                "refunded",
                why,
            )
            assert shown["pending_timeout"] is None
            provider_payment = (await stack.client.get(f"/subscriptions/{ids[name]}")).json()
            async with stack.provider.sessions() as session:
                [paid] = (
                    await session.exec(
                        select(Payment).where(col(Payment.checkout_id) == made[name]["checkout_id"])
                    )
                ).all()
            [refund] = await provider_refunds(stack, paid.id)
            assert (refund.amount_cents, refund.reason, refund.idempotency_key) == (
                900,
                why,
                f"saga-refund:{payments[name]}",
            )
            assert (paid.status, paid.refunded_cents) == ("refunded", 900)
            assert provider_payment["refunded_cents"] == 900
            assert (await types_of(stack, ids[name]))[-3:] == [
                "CompensationStarted",
                "Refunded",
                "Cancelled",
            ]
            assert len(await stack.outbox("payment.refunded.v1")) == 2
            assert cancel_reason in {
                e["reason"] for e in await stack.outbox("subscription.cancelled.v1")
            }
        announced = sorted(
            (key, event.get("reason"), event["payment_id"])
            for key, event in await stack.published(4)
        )
        assert announced == sorted(
            [
                ("payment.refunded.v1", "activation_timeout", payments["A"]),
                ("subscription.cancelled.v1", "activation_timeout", payments["A"]),
                ("payment.refunded.v1", "activation_rejected:already_subscribed", payments["B"]),
                ("subscription.cancelled.v1", "activation_rejected", payments["B"]),
            ]
        )
        assert await types_of(stack, ids["C"]) == [
            "SubscriptionRequested",
            "CheckoutCreated",
            "PaymentSucceeded",
            "ActivationTimeoutScheduled",
            "ActivationConfirmed",
        ]
        assert len(await stack.outbox("subscription.cancelled.v1")) == 2

        # the provider's own notices of the two refunds change nothing (the refund ids match)
        async def notices_delivered() -> bool:
            async with stack.provider.sessions() as session:
                rows = await session.exec(
                    select(WebhookMessage).where(col(WebhookMessage.type) == "payment.refunded")
                )
                return sum(1 for m in rows.all() if m.delivered_at is not None) == 2

        await eventually(notices_delivered, what="the provider's refund webhooks")
        for name in "AB":
            assert (await types_of(stack, ids[name])).count("Refunded") == 1

        # late and unmatched: counted, nothing appended
        before = await types_of(stack, ids["A"])
        await stack.deliver(activated(users["A"], payments["A"]))
        await stack.deliver(rejected(users["A"], payments["A"]))
        await stack.deliver(rejected(new_user(), "pay_unknown000000000", "unknown_user"))
        await stack.deliver(step("refund", "sub_nosuchsubscription0"))
        assert await types_of(stack, ids["A"]) == before
        unmatched = "tributary_billing_unmatched_messages_total"
        for kind, reason in (
            ("subscription.activated", "status_refunded"),
            ("subscription.activation_rejected", "status_refunded"),
            ("subscription.activation_rejected", "unknown_payment"),
            ("billing.saga", "unknown_subscription"),
        ):
            assert await stack.metric(unmatched, type=kind, reason=reason) == 1.0, (kind, reason)
        # each refund recorded once: by the refund step or by the provider's notice, whichever
        # came first (the four payment notices were accepted too)
        steps = "tributary_billing_saga_steps_total"
        by_step = await stack.metric(steps, step="refund", outcome="refunded")
        by_notice = await stack.metric("tributary_billing_webhooks_total", outcome="accepted") - 4
        no_change = await stack.metric("tributary_billing_webhooks_total", outcome="no_change")
        assert (by_step + by_notice, by_notice + no_change) == (2, 2)
        assert await stack.metric(steps, step="refund", outcome="refused") == 1.0
        assert await stack.metric(steps, step="activation_timeout", outcome="compensating") == 2.0

        # the read side: by state, newest first, in pages; an unknown saga is a 404
        async def listed(**params: Any) -> list[str]:
            answer = await stack.client.get("/sagas", params=params)
            assert answer.status_code == 200, answer.text
            return [item["id"] for item in answer.json()["items"]]

        async def settled() -> bool:
            return len(await listed(state="compensated")) == 2

        await eventually(settled, what="the read model")
        assert set(await listed(state="compensated")) == {ids["A"], ids["B"]}
        assert await listed(state="completed") == [ids["C"]]
        assert await listed(state="compensating") == [ids["D"]]
        first = (await stack.client.get("/sagas", params={"limit": 1})).json()
        second = (
            await stack.client.get("/sagas", params={"limit": 3, "cursor": first["next_cursor"]})
        ).json()
        everyone = [i["id"] for i in first["items"] + second["items"]]
        assert sorted(everyone) == sorted(ids.values())
        assert second["next_cursor"] is None
        row = next(i for i in second["items"] + first["items"] if i["id"] == ids["D"])
        assert (row["state"], row["reason"], row["pending_timeout_at"]) == (
            "compensating",
            "activation_timeout",
            None,
        )
        missing = await stack.client.get("/sagas/sub_nosuchsaga00000")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        bad = await stack.client.get("/sagas", params={"state": "stuck"})
        assert bad.status_code == 422
        member = stack.tokens.member(users["A"])
        assert (await stack.client.get(f"/sagas/{ids['A']}", headers=member)).status_code == 403
