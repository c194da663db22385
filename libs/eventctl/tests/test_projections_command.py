"""``eventctl projections list`` and ``rebuild``: billing's projections found through their
entry point, a rebuild's counts, the table swapped in, and the errors (exit 2)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table, select

from tributary.billing import crypto
from tributary.billing.app import create_app
from tributary.billing.commands import Billing
from tributary.billing.events import CURRENT_VERSIONS
from tributary.billing.eventstore import EventStore
from tributary.billing.metrics import BillingMetrics
from tributary.billing.plans import Plan
from tributary.billing.projections import Projector
from tributary.billing.subscription import Subscription
from tributary.billing.upcasting import UPCASTERS
from tributary.eventctl.cli import main_async
from tributary.eventctl.projections import registered
from tributary.messaging.db import create_engine, session_factory
from tributary.messaging.uow import UnitOfWork
from tributary.service.migrations import upgrade

MIGRATIONS = Path(create_app.__code__.co_filename).parent / "migrations"
AT = datetime(2026, 3, 1, tzinfo=UTC)


async def paid_subscriptions(url: str, n: int) -> None:
    """``n`` subscriptions requested, checked out and paid through billing's write path
    (aggregate, ``Billing.save``): 3 events each."""
    store = EventStore(UPCASTERS, CURRENT_VERSIONS)
    billing = Billing(store, Projector(store), BillingMetrics(), retries=3)
    engine = create_engine(url)
    sessions = session_factory(engine)
    try:
        key = await crypto.ensure_key(sessions, "usr_eventctltest01")
        async with UnitOfWork(sessions(), "/services/billing") as uow:
            for i in range(n):
                subscription = Subscription(f"sub_eventctl{i:08d}")
                sealed = crypto.seal(key, "usr_eventctltest01", crypto.aad(subscription.id, "user"))
                plan: Plan = "pro" if i % 3 else "starter"
                decided = subscription.request(
                    user=sealed, plan=plan, amount_cents=900, currency="EUR", at=AT
                )
                await billing.save(uow, subscription, decided)
                decided = subscription.record_checkout(f"co_{i}", "https://pay.example/x", AT)
                await billing.save(uow, subscription, decided)
                decided = subscription.payment_succeeded(
                    payment_id=f"pay_{i}",
                    provider_payment_id=f"pi_{i}",
                    provider_event_id=f"evt_{i}",
                    paid_at=AT,
                )
                await billing.save(uow, subscription, decided)
            await uow.commit()
    finally:
        await engine.dispose()


@pytest.fixture
async def billing_db(tmp_path: Path) -> str:
    """Billing's database with 40 paid subscriptions: 120 events."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    await upgrade(MIGRATIONS, url)
    await paid_subscriptions(url, 40)
    return url


@pytest.fixture
async def empty_billing_db(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    await upgrade(MIGRATIONS, url)
    return url


async def revenue_rows(url: str, table: str) -> list[tuple[object, ...]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            found = await conn.run_sync(lambda sync: Table(table, MetaData(), autoload_with=sync))
            query = select(found).order_by(*found.primary_key.columns)
            return [tuple(row) for row in (await conn.execute(query)).all()]
    finally:
        await engine.dispose()


def test_billing_registers_its_projections() -> None:
    found = registered()
    assert "billing" in found
    assert {"subscriptions", "revenue"} <= set(found["billing"].names())


async def test_list_then_rebuild_prints_the_counts_and_swaps_the_table(
    billing_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await main_async(["projections", "list", "--database", billing_db]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == [
        "service",
        "projection",
        "table",
        "position",
        "head",
        "lag",
        "rebuild",
        "under",
        "way",
    ]
    revenue = next(line.split() for line in listed if " revenue " in line)
    assert revenue == ["billing", "revenue", "proj_revenue", "120", "120", "0", "—"]
    before = await revenue_rows(billing_db, "proj_revenue")

    arguments = ["--database-url", billing_db, "--batch", "50", "--grace", "0"]
    assert await main_async(["projections", "rebuild", "billing.revenue", *arguments]) == 0
    out = capsys.readouterr().out
    assert "rebuilt billing.revenue: proj_revenue -> proj_revenue_2 (serving now)" in out
    assert "events replayed: 120 (up to position 120; the last 20 under the append lock)" in out
    assert f"rows: {len(before)} in proj_revenue, {len(before)} in proj_revenue_2" in out
    assert "position: 120 (the live table was at 120 when the rebuild started)" in out
    assert "2 batch(es)" in out
    assert "old table proj_revenue dropped" in out
    assert await revenue_rows(billing_db, "proj_revenue_2") == before

    assert await main_async(["projections", "list", "--database", billing_db]) == 0
    listed = capsys.readouterr().out.splitlines()
    revenue = next(line.split() for line in listed if " revenue " in line)
    assert revenue[:6] == ["billing", "revenue", "proj_revenue_2", "120", "120", "0"]


async def test_the_database_defaults_to_the_services_own_setting(
    billing_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BILLING_DATABASE_URL", billing_db)
    assert await main_async(["projections", "rebuild", "subscriptions", "--no-progress"]) == 0
    assert "proj_subscriptions -> proj_subscriptions_2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["rebuild", "nope"], "no projection 'nope' (known: billing.subscriptions"),
        (["rebuild", "other.revenue"], "no service 'other' has projections"),
        (["rebuild", "revenue", "--service", "other"], "no service 'other' has projections"),
        (["list", "--service", "other"], "no service 'other' has projections"),
    ],
)
async def test_an_unknown_name_is_an_error(
    empty_billing_db: str,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
) -> None:
    assert await main_async(["projections", *arguments, "--database", empty_billing_db]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


async def test_a_missing_database_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"sqlite:///{tmp_path / 'nothing.db'}"
    assert await main_async(["projections", "rebuild", "revenue", "--database", missing]) == 2
    assert "no SQLite database at" in capsys.readouterr().err
    assert not (tmp_path / "nothing.db").exists()
