"""The SQLite adapter: one round trip to aiosqlite's thread per statement, answers unchanged."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.messaging import sqlite_driver
from tributary.messaging.db import create_engine
from tributary.messaging.sqlite_driver import OneTripCursor, writer_lock
from tributary.testkit.waiting import eventually


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE)"))
    yield engine
    await engine.dispose()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The functions handed to aiosqlite's worker thread, by name."""
    seen: list[str] = []
    original: Any = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(fn, "__name__", repr(fn)))
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return seen


async def test_the_engine_uses_the_one_trip_cursor(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert isinstance(raw.driver_connection, aiosqlite.Connection)
        assert type(raw.dbapi_connection.cursor()) is OneTripCursor  # type: ignore[union-attr]


async def test_each_statement_is_one_round_trip_and_a_commit_another(
    engine: AsyncEngine, trips: list[str]
) -> None:
    async with engine.connect() as conn:
        trips.clear()
        await conn.execute(text("INSERT INTO t (name) VALUES ('a'), ('b')"))
        rows = (await conn.execute(text("SELECT id, name FROM t ORDER BY id"))).all()
        await conn.commit()
    assert [tuple(r) for r in rows] == [(1, "a"), (2, "b")]
    assert trips == ["_run", "_run", "commit"]


async def test_rowcount_lastrowid_returning_and_executemany_answer_as_sqlite3_does(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        inserted = await conn.execute(text("INSERT INTO t (name) VALUES ('x')"))
        assert inserted.lastrowid == 1
        many = await conn.execute(
            text("INSERT INTO t (name) VALUES (:name)"), [{"name": "y"}, {"name": "z"}]
        )
        assert many.rowcount == 2
        updated = await conn.execute(text("UPDATE t SET name = name || '!' WHERE id > 1"))
        assert updated.rowcount == 2
        returned = await conn.execute(text("DELETE FROM t WHERE id = 3 RETURNING id, name"))
        assert [tuple(r) for r in returned.all()] == [(3, "z!")]
        empty = await conn.execute(text("SELECT * FROM t WHERE id = 99"))
        assert empty.all() == []
        assert list(empty.keys()) == ["id", "name"]


async def test_errors_are_sqlalchemy_errors_and_the_connection_goes_on(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO t (name) VALUES ('dup')"))
        with pytest.raises(IntegrityError):
            await conn.execute(text("INSERT INTO t (name) VALUES ('dup')"))
        with pytest.raises(OperationalError):
            await conn.execute(text("SELECT * FROM no_such_table"))
        await conn.rollback()
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0


async def test_a_streamed_result_still_reads_row_by_row(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO t (name) VALUES (:n)"), [{"n": str(i)} for i in range(50)]
        )
    async with engine.connect() as conn:
        stream = await conn.stream(text("SELECT name FROM t ORDER BY id"))
        names = [row[0] async for row in stream]
    assert names == [str(i) for i in range(50)]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=st.lists(st.text(max_size=40) | st.none(), max_size=8))
async def test_any_text_goes_in_and_comes_back_unchanged(
    engine: AsyncEngine, values: list[str | None]
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS v (k INTEGER PRIMARY KEY, s TEXT)"))
        await conn.execute(text("DELETE FROM v"))
        if values:
            await conn.execute(
                text("INSERT INTO v (k, s) VALUES (:k, :s)"),
                [{"k": i, "s": v} for i, v in enumerate(values)],
            )
        back = (await conn.execute(text("SELECT s FROM v ORDER BY k"))).scalars().all()
    assert back == values


# -- writers queue in the event loop ----------------------------------------------------------


def lock_of(engine: AsyncEngine) -> asyncio.Lock:
    return writer_lock(os.path.realpath(str(engine.url.database)))


async def test_a_second_writer_waits_in_the_loop_and_goes_on_when_the_first_commits(
    engine: AsyncEngine,
) -> None:
    first_wrote = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def first() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t (name) VALUES ('first')"))
            first_wrote.set()
            await release.wait()
            order.append("first commits")

    async def second() -> None:
        await first_wrote.wait()
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t (name) VALUES ('second')"))
            order.append("second wrote")

    async def reader() -> int:
        await first_wrote.wait()
        async with engine.connect() as conn:  # WAL readers never queue
            return int((await conn.execute(text("SELECT count(*) FROM t"))).scalar_one())

    one, two = asyncio.create_task(first()), asyncio.create_task(second())
    assert await asyncio.wait_for(reader(), timeout=5) == 0
    lock = lock_of(engine)

    async def queued() -> bool:
        return len(lock._waiters or ()) == 1

    await eventually(queued, what="the second writer queued")
    assert order == []  # the second writer is queued, not failed
    release.set()
    await asyncio.wait_for(asyncio.gather(one, two), timeout=10)
    assert order == ["first commits", "second wrote"]
    assert not lock.locked()


async def test_rollbacks_and_failed_statements_give_the_lock_back(engine: AsyncEngine) -> None:
    lock = lock_of(engine)
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO t (name) VALUES ('a')"))
        assert lock.locked()
        await conn.rollback()
        assert not lock.locked()
        await conn.execute(text("INSERT INTO t (name) VALUES ('b')"))
        await conn.commit()
        with pytest.raises(IntegrityError):
            await conn.execute(text("INSERT INTO t (name) VALUES ('b')"))
        await conn.rollback()
    assert not lock.locked()
    async with engine.connect() as conn:  # checked in with a write open: the pool rolls back
        await conn.execute(text("INSERT INTO t (name) VALUES ('c')"))
    assert not lock.locked()
    async with engine.connect() as conn:
        names = (await conn.execute(text("SELECT name FROM t ORDER BY id"))).scalars().all()
    assert names == ["b"]


async def test_a_writer_waiting_past_the_busy_timeout_gets_database_is_locked(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_driver, "BUSY_TIMEOUT", 0.2)
    async with engine.connect() as holder:
        await holder.execute(text("INSERT INTO t (name) VALUES ('held')"))
        async with engine.connect() as waiter:
            with pytest.raises(OperationalError, match="database is locked"):
                await waiter.execute(text("INSERT INTO t (name) VALUES ('late')"))
        await holder.commit()


async def test_the_pool_hands_out_the_most_recently_returned_connection(
    engine: AsyncEngine,
) -> None:
    """After a burst opened several connections, one at a time reuses the same one (LIFO):
    the others stay idle instead of each warming its thread and caches up in turn."""
    release = asyncio.Event()
    opened: list[int] = []

    async def hold() -> None:
        async with engine.connect() as conn:
            opened.append(id((await conn.get_raw_connection()).driver_connection))
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(4)]

    async def all_open() -> bool:
        return len(opened) == 4

    await eventually(all_open, timeout=10, what="four connections open")
    release.set()
    await asyncio.gather(*holders)
    assert len(set(opened)) == 4
    used = []
    for _ in range(6):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            used.append(id((await conn.get_raw_connection()).driver_connection))
    assert len(set(used)) == 1
