"""Every service's migration chain gives the runtime tables the shape the models declare.

A database made by revision 0001 (before parked rows) is upgraded with its rows in place, and a
fresh one is built from scratch: both end up with the models' columns and indexes. A database
from just before scheduled rows gains ``deliver_at`` with its waiting rows still due at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from tributary.messaging.db import RUNTIME_TABLES, create_engine
from tributary.service.migrations import alembic_config
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

ROOT = Path(__file__).resolve().parents[3]
WITHOUT_RUNTIME = {"payment-provider"}
"""Members that are no Tributary service: the payment provider stands in for an external
system (its own tables, no broker, no outbox or inbox)."""
SERVICES = sorted(
    p.name
    for p in (ROOT / "services").iterdir()
    if (p / "src").is_dir() and p.name not in WITHOUT_RUNTIME
)


def migrations_of(service: str) -> Path:
    return ROOT / "services" / service / "src" / "tributary" / service / "migrations"


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'svc.db'}"
        return
    server: Found = request.getfixturevalue("postgres")
    name = f"m_{uuid.uuid4().hex[:12]}"
    yield await create_postgres_database(server.url, name)
    await drop_postgres_database(server.url, name)


async def migrate(service: str, url: str, revision: str, *, down: bool = False) -> None:
    cfg = alembic_config(migrations_of(service), url)
    step = command.downgrade if down else command.upgrade
    await asyncio.to_thread(step, cfg, revision)


def _shape(conn: Connection) -> dict[str, Any]:
    found = inspect(conn)
    return {
        table.name: (
            {c["name"] for c in found.get_columns(table.name)},
            {
                (i["name"], tuple(i["column_names"]))
                for i in found.get_indexes(table.name)
                if "duplicates_constraint" not in i  # PostgreSQL's index behind UNIQUE
            },
        )
        for table in RUNTIME_TABLES
    }


def declared_shape() -> dict[str, Any]:
    return {
        table.name: (
            {c.name for c in table.columns},
            {(i.name, tuple(c.name for c in i.columns)) for i in table.indexes},
        )
        for table in RUNTIME_TABLES
    }


async def shape_of(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_shape)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("service", SERVICES)
async def test_an_upgraded_database_matches_the_models_and_keeps_its_rows(
    service: str, database_url: str
) -> None:
    await migrate(service, database_url, "0001")
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO tributary_outbox (event_id, routing_key, body, trace_headers,"
                " created_at, attempts) VALUES ('e-1', 'user.created.v2', :body, '{}',"
                " CURRENT_TIMESTAMP, 0)"
            ),
            {"body": b"{}"},
        )
    await migrate(service, database_url, "head")

    assert await shape_of(database_url) == declared_shape()
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT event_id, parked_at FROM tributary_outbox"))).all()
    await engine.dispose()
    assert [tuple(r) for r in rows] == [("e-1", None)]


@pytest.mark.parametrize("service", SERVICES)
async def test_the_chain_goes_down_and_up_again(service: str, database_url: str) -> None:
    await migrate(service, database_url, "head")
    await migrate(service, database_url, "0001", down=True)
    await migrate(service, database_url, "head")

    assert await shape_of(database_url) == declared_shape()


def revision_before(service: str, helper: str) -> str | None:
    """The revision a service's chain had before the one whose upgrade calls ``helper`` (None
    when that is its first: no database of the service ever lacked what ``helper`` adds)."""
    scripts = ScriptDirectory.from_config(alembic_config(migrations_of(service), "sqlite://"))
    for script in scripts.walk_revisions():
        if helper in script.module.upgrade.__code__.co_names:
            assert not isinstance(script.down_revision, (tuple, list)), script.revision
            return script.down_revision
    raise AssertionError(f"{service}: no revision calls {helper}")


@pytest.mark.parametrize("service", SERVICES)
async def test_a_database_from_before_scheduled_rows_gains_deliver_at_and_keeps_its_rows(
    service: str, database_url: str
) -> None:
    before = revision_before(service, "schedule_outbox_rows")
    engine = create_engine(database_url)
    if before is not None:
        await migrate(service, database_url, before)
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO tributary_outbox (event_id, routing_key, body, trace_headers,"
                    " created_at, attempts) VALUES ('e-1', 'user.created.v2', :body, '{}',"
                    " CURRENT_TIMESTAMP, 0)"
                ),
                {"body": b"{}"},
            )
    await migrate(service, database_url, "head")

    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT event_id, deliver_at FROM tributary_outbox"))).all()
    await engine.dispose()
    # the row waiting before the upgrade is still due at once
    assert [tuple(r) for r in rows] == ([("e-1", None)] if before is not None else [])
    columns, indexes = (await shape_of(database_url))["tributary_outbox"]
    assert "deliver_at" in columns
    assert (
        "ix_tributary_outbox_waiting",
        ("published_at", "parked_at", "deliver_at", "seq"),
    ) in indexes
