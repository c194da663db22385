"""Blue/green rebuilds of projections: the rebuilt table equals the live one, appends made
during the rebuild are in it after the swap, readers keep the old table until the swap, a
fixed projection bug is fixed in the rebuilt table, an empty store, an interrupted rebuild,
an erasure during the rebuild, and nothing is appended, staged or published."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command as alembic
from sqlalchemy import MetaData, Table, insert, inspect, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel import select as select_models
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing import crypto, events
from tributary.billing.eventstore import StoredEvent
from tributary.billing.models import ProjectionState
from tributary.billing.projections import RevenueProjection, SubscriptionsProjection
from tributary.billing.rebuild import (
    RebuildProgress,
    RebuildRunning,
    claim_name,
    rebuild,
)
from tributary.messaging.db import OutboxRow, now
from tributary.messaging.erasure import remember_erased
from tributary.service.migrations import alembic_config, upgrade
from tributary.testkit.infra import Found

from .conftest import MIGRATIONS
from .harness import billing_stack, new_user
from .workload import Workload, billing_with

Sessions = async_sessionmaker[AsyncSession]
NAMES = ("subscriptions", "revenue")


async def rows(sessions: Sessions, table: Table | str) -> list[dict[str, Any]]:
    """Every row of a table as the database has it (reflected: plain column types)."""
    name = table if isinstance(table, str) else table.name
    async with sessions() as session:
        connection = await session.connection()
        found = await connection.run_sync(lambda sync: Table(name, MetaData(), autoload_with=sync))
        ordered = select(found).order_by(*found.primary_key.columns)
        return [dict(row._mapping) for row in (await session.exec(ordered)).all()]  # type: ignore[call-overload]


async def live(sessions: Sessions, name: str) -> tuple[str, list[dict[str, Any]]]:
    async with sessions() as session:
        state = await session.get(ProjectionState, name)
    assert state is not None
    return state.table_name, await rows(sessions, state.table_name)


async def tables(sessions: Sessions, name: str) -> set[str]:
    """The tables of projection ``name`` in the database."""
    async with sessions() as session:
        connection = await session.connection()
        names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    return {n for n in names if n == f"proj_{name}" or n.startswith(f"proj_{name}_")}


async def state_rows(sessions: Sessions) -> dict[str, tuple[str, int]]:
    async with sessions() as session:
        found = (await session.exec(select(ProjectionState))).all()  # type: ignore[call-overload]
    return {s.name: (s.table_name, s.position) for (s,) in found}


async def head(sessions: Sessions) -> int:
    async with sessions() as session:
        return await billing_with().store.head(session)


async def built_from_scratch(
    sessions: Sessions, name: str, table_name: str
) -> list[dict[str, Any]]:
    """What ``name`` is after every event in the store, built apart (then dropped)."""
    async with sessions() as session:
        table, _ = await billing_with().projector.build(session, name, table_name)
        await session.commit()
    try:
        return await rows(sessions, table)
    finally:
        async with sessions() as session:
            await session.run_sync(lambda sync: table.drop(sync.connection()))
            await session.commit()


async def test_a_rebuild_equals_the_live_table_and_is_swapped_in(sessions: Sessions) -> None:
    billing = billing_with()
    await Workload(sessions, billing, seed=1, per_unit=10).append(120)
    top = await head(sessions)
    assert top == 120
    for name in billing.projector.projections:  # every projection the service has
        old_table, before = await live(sessions, name)
        assert old_table == f"proj_{name}"
        told: list[RebuildProgress] = []
        report = await rebuild(
            sessions, billing.projector, name, batch=30, progress=told.append, grace=0
        )
        assert (report.old_table, report.new_table) == (f"proj_{name}", f"proj_{name}_2")
        assert (report.events, report.position, report.from_position) == (120, 120, 120)
        assert report.at_swap == 30  # the last batch, applied under the append lock
        assert report.old_rows == report.new_rows == len(before) > 0
        assert report.batches == 3
        assert report.dropped
        assert report.cleaned == ()
        table_name, after = await live(sessions, name)
        assert table_name == f"proj_{name}_2"
        assert after == before  # row by row
        assert [p.phase for p in told] == ["build"] * 3 + ["swap", "done"]
        assert [p.position for p in told] == [30, 60, 90, 120, 120]
        assert await tables(sessions, name) == {f"proj_{name}_2"}
        assert (await state_rows(sessions))[name] == (f"proj_{name}_2", 120)
        assert claim_name(name) not in await state_rows(sessions)
    # the service goes on with the new tables, and a second rebuild makes generation 3
    await Workload(sessions, billing, seed=2).append(30)
    report = await rebuild(sessions, billing.projector, "revenue", grace=0)
    assert (report.old_table, report.new_table, report.position) == (
        "proj_revenue_2",
        "proj_revenue_3",
        150,
    )
    assert (await live(sessions, "revenue"))[1] == await built_from_scratch(
        sessions, "revenue", "proj_revenue_check"
    )
    assert await tables(sessions, "revenue") == {"proj_revenue_3"}


async def test_appends_during_the_rebuild_are_in_the_table_swapped_in(sessions: Sessions) -> None:
    billing = billing_with()
    await Workload(sessions, billing, seed=3, per_unit=10).append(90)
    batch_done, appended, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def appender() -> None:
        """Between two batches one unit of appends, and another racing with the next batch
        (paced by the batches: SQLite's one write lock would let a free-running writer starve
        the rebuild's batches)."""
        writer = Workload(sessions, billing, seed=4)
        while not stop.is_set():
            await batch_done.wait()
            batch_done.clear()
            await writer.append(3)
            appended.set()
            await writer.append(2)

    old_rows: dict[str, list[dict[str, Any]]] = {}

    async def between_batches(progress: RebuildProgress) -> None:
        if progress.phase != "build":
            return
        # readers still see the old table, which keeps being updated
        table_name, old_rows[progress.name] = await live(sessions, progress.name)
        assert table_name == f"proj_{progress.name}"
        appended.clear()
        batch_done.set()
        await asyncio.wait_for(appended.wait(), 30)  # the appender got one in meanwhile

    task = asyncio.create_task(appender())
    try:
        for name in NAMES:
            report = await rebuild(
                sessions, billing.projector, name, batch=30, progress=between_batches, grace=0
            )
            assert report.events == report.position > 90
            assert report.old_rows == report.new_rows or name == "subscriptions"
    finally:
        stop.set()
        batch_done.set()
        await task
    top = await head(sessions)
    assert top > 90
    for name in NAMES:
        table_name, after = await live(sessions, name)
        assert table_name == f"proj_{name}_2"
        assert (await state_rows(sessions))[name] == (table_name, top)
        assert after == await built_from_scratch(sessions, name, f"proj_{name}_check")
        assert old_rows[name]  # the old table was read during the build


class MiscountedRevenue(RevenueProjection):
    """A bug: every refund is counted twice."""

    async def apply(self, session: AsyncSession, table: Table, event: StoredEvent) -> None:
        await super().apply(session, table, event)
        if event.type == "Refunded":
            await super().apply(session, table, event)


def expected_revenue(stored: list[StoredEvent]) -> list[dict[str, Any]]:
    """Revenue by plan and currency, summed from the events by hand."""
    lines: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"payments": 0, "gross_cents": 0, "refunds": 0, "refunded_cents": 0}
    )
    for event in stored:
        domain = events.parse(event.type, event.data)
        if isinstance(domain, events.PaymentSucceeded):
            line = lines[(domain.plan, domain.currency)]
            line["payments"] += 1
            line["gross_cents"] += domain.amount_cents
        elif isinstance(domain, events.Refunded):
            line = lines[(domain.plan, domain.currency)]
            line["refunds"] += 1
            line["refunded_cents"] += domain.amount_cents
    return [{"plan": p, "currency": c, **lines[(p, c)]} for p, c in sorted(lines)]


async def test_a_projection_bug_fixed_and_rebuilt_gives_the_right_answer(
    sessions: Sessions,
) -> None:
    buggy = billing_with((SubscriptionsProjection(), MiscountedRevenue()))
    await Workload(sessions, buggy, seed=5, per_unit=10).append(100)
    async with sessions() as session:
        stored = await buggy.store.read_all(session, limit=10_000)
    right = expected_revenue(stored)
    assert sum(line["refunds"] for line in right) > 0
    _, wrong = await live(sessions, "revenue")
    assert wrong != right
    assert sum(w["refunded_cents"] for w in wrong) > sum(r["refunded_cents"] for r in right)

    fixed = billing_with()  # the code with the bug fixed
    report = await rebuild(sessions, fixed.projector, "revenue", batch=32, grace=0)
    assert report.events == 100
    assert (await live(sessions, "revenue"))[1] == right
    # and the fixed code goes on from there
    await Workload(sessions, fixed, seed=6).append(60)
    async with sessions() as session:
        stored = await fixed.store.read_all(session, limit=10_000)
    assert (await live(sessions, "revenue"))[1] == expected_revenue(stored)


async def test_an_empty_store_rebuilds_to_empty_tables(sessions: Sessions) -> None:
    billing = billing_with()
    for name in NAMES:
        told: list[RebuildProgress] = []
        report = await rebuild(sessions, billing.projector, name, progress=told.append, grace=0)
        assert (report.events, report.position, report.old_rows, report.new_rows) == (0, 0, 0, 0)
        assert report.new_table == f"proj_{name}_2"
        assert [p.phase for p in told] == ["build", "swap", "done"]
        assert await live(sessions, name) == (f"proj_{name}_2", [])
    # and it serves: the first events land in the new tables
    await Workload(sessions, billing, seed=7).append(20)
    for name in NAMES:
        assert (await live(sessions, name))[1] == await built_from_scratch(
            sessions, name, f"proj_{name}_check"
        )


async def test_an_interrupted_rebuild_leaves_nothing_in_the_way(sessions: Sessions) -> None:
    billing = billing_with()
    await Workload(sessions, billing, seed=8, per_unit=10).append(90)
    _, before = await live(sessions, "revenue")
    states = await state_rows(sessions)

    class Interrupted(Exception):
        pass

    def interrupt(progress: RebuildProgress) -> None:
        if progress.events >= 60:
            raise Interrupted

    # a failure mid-build: the half-built table is dropped, the claim given up
    with pytest.raises(Interrupted):
        await rebuild(sessions, billing.projector, "revenue", batch=30, progress=interrupt)
    assert await state_rows(sessions) == states
    assert await tables(sessions, "revenue") == {"proj_revenue"}
    assert (await live(sessions, "revenue"))[1] == before

    # a rebuild killed mid-build (its claim and half-built table left behind) ...
    async with sessions() as session:
        session.add(ProjectionState(name=claim_name("revenue"), table_name="proj_revenue_5"))
        await session.commit()
    junk = RevenueProjection().table("proj_revenue_5")
    async with sessions() as session:
        await session.run_sync(lambda sync: junk.create(sync.connection()))
        await session.exec(
            insert(junk).values(
                plan="pro", currency="EUR", payments=1, gross_cents=1, refunds=0, refunded_cents=0
            )
        )
        await session.commit()
    # ... holds the next run off while its claim is fresh
    with pytest.raises(RebuildRunning, match="proj_revenue_5"):
        await rebuild(sessions, billing.projector, "revenue")
    assert (await state_rows(sessions))[claim_name("revenue")] == ("proj_revenue_5", 0)
    # and once it has been silent long enough, the next run takes over and cleans up
    async with sessions() as session:
        await session.exec(
            update(ProjectionState)
            .where(col(ProjectionState.name) == claim_name("revenue"))
            .values(updated_at=now() - timedelta(minutes=5))
        )
        await session.commit()
    report = await rebuild(sessions, billing.projector, "revenue", grace=0)
    assert report.cleaned == ("proj_revenue_5",)
    assert report.new_table == "proj_revenue_6"
    assert (await live(sessions, "revenue")) == ("proj_revenue_6", before)
    assert await tables(sessions, "revenue") == {"proj_revenue_6"}
    assert claim_name("revenue") not in await state_rows(sessions)


async def test_a_user_erased_during_the_rebuild_is_not_brought_back(sessions: Sessions) -> None:
    billing = billing_with()
    workload = Workload(sessions, billing, seed=9, users=4, per_unit=10)
    await workload.append(90)
    erased_user = workload.keys[0][0]
    _, before = await live(sessions, "subscriptions")
    assert any(r["user_id"] == erased_user for r in before)

    async def erase_once(progress: RebuildProgress) -> None:
        if progress.phase != "build" or progress.events != 50:
            return
        # what billing's user.erased handler does to its tables, between two batches
        async with sessions() as session:
            await crypto.shred(session, erased_user)
            table = await billing.projector.table_of(session, "subscriptions")
            await session.exec(
                update(table).where(table.c.user_id == erased_user).values(user_id=None)
            )
            await remember_erased(session, erased_user)
            await session.commit()

    await rebuild(
        sessions, billing.projector, "subscriptions", batch=50, progress=erase_once, grace=0
    )
    _, after = await live(sessions, "subscriptions")
    assert len(after) == len(before)
    assert all(r["user_id"] != erased_user for r in after)
    assert any(r["user_id"] is None for r in after)
    assert after == await built_from_scratch(sessions, "subscriptions", "proj_check")


async def outbox_rows(sessions: Sessions) -> list[tuple[int | None, str, str]]:
    """What is staged in the outbox (published or not: the relay's business)."""
    async with sessions() as session:
        found = (await session.exec(select_models(OutboxRow).order_by(col(OutboxRow.seq)))).all()
    return [(r.seq, r.routing_key, r.event_id) for r in found]


async def test_a_rebuild_in_a_running_service_stages_and_publishes_nothing(
    sqlite_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(sqlite_url, rabbitmq.url, tmp_path) as stack:
        made = [await stack.subscribe(new_user(), plan) for plan in ("starter", "pro")]
        for subscription in made:
            await stack.provider.pay(subscription["checkout_id"], "succeed")
        first = await stack.published(expect=2)
        assert sorted(key for key, _ in first) == ["payment.succeeded.v1"] * 2

        staged = await outbox_rows(stack.sessions)
        revenue = (await stack.client.get("/revenue")).json()
        listed = (await stack.client.get("/subscriptions")).json()
        seen: list[bool] = []

        async def read_meanwhile(progress: RebuildProgress) -> None:
            if progress.phase == "build":  # the API still answers from the old table
                seen.append((await stack.client.get("/revenue")).json() == revenue)
                seen.append((await stack.client.get("/subscriptions")).json() == listed)

        for name in NAMES:
            await rebuild(
                stack.sessions,
                stack.billing.projector,
                name,
                batch=2,
                progress=read_meanwhile,
                grace=0,
            )
        assert seen
        assert all(seen)
        assert (await stack.client.get("/revenue")).json() == revenue
        assert (await stack.client.get("/subscriptions")).json() == listed
        assert await outbox_rows(stack.sessions) == staged  # nothing staged

        # nothing published either: the next message is the next payment's, not a replay
        sentinel = await stack.subscribe(new_user(), "starter")
        await stack.provider.pay(sentinel["checkout_id"], "succeed")
        [(key, data)] = await stack.published(expect=1)
        assert key == "payment.succeeded.v1"
        assert data["payment_id"] not in {d["payment_id"] for _, d in first}
        after = await outbox_rows(stack.sessions)
        assert after[: len(staged)] == staged
        assert [k for _, k, _ in after].count("payment.succeeded.v1") == 3


async def test_the_migrations_go_down_and_up_again_after_a_rebuild(
    sessions: Sessions, database_url: str
) -> None:
    billing = billing_with()
    await Workload(sessions, billing, seed=10, per_unit=10).append(20)
    for name in ("revenue", "subscriptions", "sagas"):
        await rebuild(sessions, billing.projector, name, grace=0)
    config = alembic_config(MIGRATIONS, database_url)
    await asyncio.to_thread(alembic.downgrade, config, "base")
    async with sessions() as session:
        left = await session.run_sync(lambda sync: inspect(sync.connection()).get_table_names())
    assert [name for name in left if name.startswith("proj_")] == []
    await upgrade(MIGRATIONS, database_url)
    async with sessions() as session:
        assert await billing.projector.position_of(session, "revenue") == 0
