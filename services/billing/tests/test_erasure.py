"""Erasure reaches the event store without rewriting it: the user id sealed in the stored
events becomes unreadable (their data key is deleted), the read models lose it (rebuilt too),
the outbox is purged of it, and nothing about the user is stored or announced again."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, text

from tributary.billing.models import DataKey
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .harness import Stack, billing_stack, erased, new_user, notice


async def dump(stack: Stack, table: str) -> str:
    """Everything in a table, as text (to look for a user id anywhere in it)."""
    async with stack.sessions() as session:
        found = await session.exec(text(f"SELECT * FROM {table}"))  # type: ignore[call-overload]  # noqa: S608
        return "\n".join(
            repr(row) + "".join(v.decode(errors="replace") for v in row if isinstance(v, bytes))
            for row in found.all()
        )


async def test_an_erased_users_id_is_unreadable_in_the_store_and_gone_from_the_read_models(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(database_url, rabbitmq.url, tmp_path) as stack:
        ada, bob = new_user(), new_user()
        ada_sub = await stack.subscribe(ada, "pro")
        bob_sub = await stack.subscribe(bob)
        await stack.provider.pay(ada_sub["checkout_id"], "succeed")

        async def paid() -> bool:
            shown = await stack.client.get(f"/subscriptions/{ada_sub['id']}")
            return bool(shown.json()["status"] == "paid")

        await eventually(paid, what="Ada's payment")
        # the user id never stands in the store in clear, only sealed
        assert ada not in await dump(stack, "event_store")
        assert ada in await dump(stack, "proj_subscriptions")

        await stack.deliver(erased(ada))
        await stack.deliver(erased(ada))  # a replay erases again, harmlessly

        async with stack.sessions() as session:
            keys = list((await session.exec(select(DataKey))).scalars())  # type: ignore[call-overload]
        assert [k.user_id for k in keys] == [bob]
        for table in ("event_store", "proj_subscriptions", "tributary_outbox", "stream_index"):
            assert ada not in await dump(stack, table), table
        shown = (await stack.client.get(f"/subscriptions/{ada_sub['id']}")).json()
        # the figures stay (accounting); who it was is gone
        assert (shown["user_id"], shown["status"], shown["amount_cents"]) == (None, "paid", 2900)
        assert (await stack.client.get(f"/subscriptions/{bob_sub['id']}")).json()["user_id"] == bob
        listed = await stack.client.get("/subscriptions", params={"user_id": ada})
        assert listed.json()["items"] == []
        revenue = (await stack.client.get("/revenue")).json()["lines"]
        assert [(line["plan"], line["gross_cents"]) for line in revenue] == [("pro", 2900)]

        # rebuilt after the erasure, the read model holds no trace of her either
        async with stack.sessions() as session:
            rebuilt, _ = await stack.billing.projector.build(
                session, "subscriptions", "proj_subscriptions_rebuilt"
            )
            await session.commit()
        assert ada not in await dump(stack, rebuilt.name)
        assert bob in await dump(stack, rebuilt.name)

        # nothing new about her: no subscription, and a later refund is recorded, not announced
        refused = await stack.client.post(
            "/subscriptions", json={"plan": "starter", "user_id": ada}
        )
        assert refused.status_code == 404
        payment = (await stack.provider.client.get(f"/checkouts/{ada_sub['checkout_id']}")).json()[
            "payment_id"
        ]
        refund = notice(
            "payment.refunded",
            {
                "checkout_id": ada_sub["checkout_id"],
                "reference": ada_sub["id"],
                "payment_id": payment,
                "refund_id": "re_after_erasure_01",
                "amount_cents": 2900,
                "currency": "EUR",
                "refunded_at": datetime.now(UTC).isoformat(),
            },
        )
        assert (await stack.webhook(refund)).json() == {"status": "accepted"}
        stream = await stack.stream(ada_sub["id"])
        assert [e.type for e in stream][-2:] == ["Refunded", "Cancelled"]
        assert await stack.outbox("payment.refunded.v1") == []
        assert ada not in json.dumps(await stack.outbox())
