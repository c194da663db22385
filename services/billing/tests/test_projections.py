"""Projections apply each event exactly once: the live updates, a redelivered message, events
offered again (a catch-up overlapping the live position), and a table rebuilt from the whole
store comes out the same as the live one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Table, select

from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .harness import Stack, activated, billing_stack, new_user


async def rows(stack: Stack, table: Table) -> list[dict[str, Any]]:
    async with stack.sessions() as session:
        found = await session.exec(select(table).order_by(*table.primary_key.columns))  # type: ignore[call-overload]
        return [dict(row._mapping) for row in found.all()]


async def live(stack: Stack, name: str) -> tuple[Table, list[dict[str, Any]]]:
    async with stack.sessions() as session:
        table = await stack.billing.projector.table_of(session, name)
    return table, await rows(stack, table)


async def test_each_event_reaches_each_projection_once_and_a_rebuild_matches_the_live_tables(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(database_url, rabbitmq.url, tmp_path) as stack:
        users = [new_user() for _ in range(3)]
        made = [
            await stack.subscribe(u, plan)
            for u, plan in zip(users, ("starter", "pro", "pro"), strict=True)
        ]
        await stack.provider.pay(made[0]["checkout_id"], "succeed")
        await stack.provider.pay(made[1]["checkout_id"], "succeed")
        await stack.provider.pay(made[2]["checkout_id"], "decline")

        async def settled() -> bool:
            async with stack.sessions() as session:
                return len(await stack.billing.store.read_all(session)) == 11

        # 3 x (requested, checkout) + 2 x (paid, activation timeout scheduled) + declined
        await eventually(settled, what="three subscriptions, two paid and one declined")
        payment = (await stack.client.get(f"/subscriptions/{made[1]['id']}")).json()["payment_id"]
        await stack.deliver(activated(users[1], payment, "pro"), times=4)  # redelivered

        async with stack.sessions() as session:
            everything = await stack.billing.store.read_all(session)
            head = await stack.billing.store.head(session)
            assert len(everything) == 12
            for name in ("subscriptions", "revenue", "sagas"):
                assert await stack.billing.projector.position_of(session, name) == head
        _, subscriptions = await live(stack, "subscriptions")
        revenue_table, revenue = await live(stack, "revenue")
        _, sagas = await live(stack, "sagas")
        assert sorted(r["status"] for r in subscriptions) == ["active", "paid", "payment_failed"]
        assert sorted(r["state"] for r in sagas) == ["awaiting_activation", "completed", "failed"]
        assert [(r["plan"], r["payments"], r["gross_cents"]) for r in revenue] == [
            ("pro", 1, 2900),
            ("starter", 1, 900),
        ]

        # every event offered again (a redelivery, a catch-up overlapping the live updates)
        async with stack.sessions() as session:
            assert await stack.billing.projector.apply(session, everything) == 0
            assert await stack.billing.projector.catch_up(session) == 0
            await session.commit()
        assert (await live(stack, "revenue"))[1] == revenue
        assert (await live(stack, "subscriptions"))[1] == subscriptions
        assert (await live(stack, "sagas"))[1] == sagas

        # rebuilt from the whole store into fresh tables: the same rows
        async with stack.sessions() as session:
            built, position = await stack.billing.projector.build(
                session, "subscriptions", "proj_subscriptions_2"
            )
            built_revenue, _ = await stack.billing.projector.build(
                session, "revenue", "proj_revenue_2"
            )
            built_sagas, _ = await stack.billing.projector.build(session, "sagas", "proj_sagas_2")
            await session.commit()
        assert position == head
        assert await rows(stack, built) == subscriptions
        assert await rows(stack, built_revenue) == revenue
        assert await rows(stack, built_sagas) == sagas
        assert revenue_table.name == "proj_revenue"  # the live table was left as it was
