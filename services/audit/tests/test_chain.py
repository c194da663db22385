from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from tributary.audit import chain
from tributary.audit.app import create_app
from tributary.audit.models import AuditEntry
from tributary.messaging.db import create_engine, now, session_factory
from tributary.service.migrations import upgrade
from tributary.service.testing import FakeUnitOfWork, fake_uow

MIGRATIONS = Path(create_app.__code__.co_filename).parent / "migrations"


def an_entry(n: int) -> AuditEntry:
    return AuditEntry(
        event_id=f"evt-{n}",
        type="com.tributary.role.changed.v1",
        data_type="role.changed.v1",
        source="/services/identity",
        subject=f"users/usr_{n:010d}",
        event_time=now(),
        recorded_at=now(),
        data={"user_id": f"usr_{n:010d}", "old_role": "member", "new_role": "admin"},
    )


async def chain_of(uow: FakeUnitOfWork, n: int) -> list[AuditEntry]:
    for i in range(1, n + 1):
        await chain.append(uow.session, an_entry(i))
    return list((await uow.session.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))).all())


async def test_an_intact_chain_verifies_and_reports_its_head(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        entries = await chain_of(uow, 3)
        result = await chain.verify(uow.session)
        assert (result.ok, result.entries, result.head) == (True, 3, entries[-1].hash)


async def test_an_empty_log_verifies(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        result = await chain.verify(uow.session)
        assert (result.ok, result.entries, result.head) == (True, 0, None)


async def test_a_changed_entry_breaks_the_chain_at_its_seq(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        entries = await chain_of(uow, 4)
        entries[2].data = {**entries[2].data, "new_role": "owner"}
        await uow.session.flush()
        result = await chain.verify(uow.session)
        assert (result.ok, result.broken_at, result.entries) == (False, 3, 2)
        assert result.reason == "the entry's content does not match its hash"


async def test_a_changed_entry_with_a_recomputed_hash_breaks_the_next_link(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        entries = await chain_of(uow, 4)
        forged = entries[1]
        forged.subject = "users/usr_someoneelse"
        forged.hash = chain.entry_hash(forged, forged.prev_hash)
        await uow.session.flush()
        result = await chain.verify(uow.session)
        assert (result.ok, result.broken_at) == (False, 3)
        assert result.reason == "prev_hash does not match the hash of the entry before it"


async def test_a_deleted_entry_is_reported_as_missing(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        entries = await chain_of(uow, 4)
        await uow.session.delete(entries[1])
        await uow.session.flush()
        result = await chain.verify(uow.session)
        assert (result.ok, result.broken_at, result.reason) == (False, 3, "entry 2 is missing")


async def test_verification_reads_past_one_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chain, "VERIFY_PAGE", 2)
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await chain_of(uow, 5)
        assert (await chain.verify(uow.session)).entries == 5


@pytest.fixture
async def postgres_engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(MIGRATIONS, postgres_url)
    engine = create_engine(postgres_url)
    yield engine
    await engine.dispose()


async def test_concurrent_appenders_on_postgres_extend_one_chain(
    postgres_engine: AsyncEngine,
) -> None:
    sessions = session_factory(postgres_engine)

    async def append_one(n: int) -> None:
        async with sessions() as session, session.begin():
            await chain.append(session, an_entry(n))

    await asyncio.gather(*(append_one(n) for n in range(12)))
    async with sessions() as session:
        result = await chain.verify(session)
    assert (result.ok, result.entries) == (True, 12)


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    await upgrade(MIGRATIONS, url)
    engine = create_engine(url)
    yield engine
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def any_engine(request: pytest.FixtureRequest) -> AsyncEngine:
    """The migrated audit database on SQLite, then on PostgreSQL."""
    return cast(AsyncEngine, request.getfixturevalue(f"{request.param}_engine"))


def chain_reads(engine: AsyncEngine) -> list[str]:
    """The statements that read the chain's head, as they run."""
    seen: list[str] = []

    def before(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "audit_entries" in statement:
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return seen


async def test_a_transaction_reads_the_head_once_however_many_entries_it_appends(
    any_engine: AsyncEngine,
) -> None:
    reads = chain_reads(any_engine)
    sessions = session_factory(any_engine)
    async with sessions() as session, session.begin():
        for n in range(1, 6):
            await chain.append(session, an_entry(n))
        assert (await chain.head(session)).seq == 5
    assert len(reads) == 1
    async with sessions() as session:
        result = await chain.verify(session)
    assert (result.ok, result.entries) == (True, 5)


async def test_the_next_transaction_reads_the_head_again_after_others_appended_or_a_rollback(
    any_engine: AsyncEngine,
) -> None:
    sessions = session_factory(any_engine)
    async with sessions() as mine:
        async with mine.begin():
            await chain.append(mine, an_entry(1))
        async with sessions() as other, other.begin():  # another replica appends in between
            await chain.append(other, an_entry(2))
        async with mine.begin():
            assert (await chain.append(mine, an_entry(3))).seq == 3
        transaction = await mine.begin()
        await chain.append(mine, an_entry(4))
        await transaction.rollback()  # that entry never was
        async with mine.begin():
            assert (await chain.append(mine, an_entry(5))).seq == 4
    async with sessions() as session:
        result = await chain.verify(session)
    assert (result.ok, result.entries) == (True, 4)


def test_the_hash_format_is_the_one_stored_chains_were_written_with() -> None:
    entry = AuditEntry(
        seq=7,
        event_id="evt-7",
        type="com.tributary.user.created.v1",
        data_type="user.created.v2",
        source="/services/identity",
        subject="users/usr_0000000007",
        correlation_id="corr-7",
        causation_id=None,
        event_time=datetime(2026, 3, 1, 13, 30, tzinfo=timezone(timedelta(hours=1))),
        recorded_at=datetime(2026, 3, 1, 12, 30, 0, 123456, tzinfo=UTC),
        data={"user_id": "usr_0000000007", "email": "a***@example.com", "name": "Zoë"},
        trace_id="0af7651916cd43dd8448eb211c80319c",  # outside the hash
    )
    # computed by the ORM-based append this chain was first written with
    expected = "1b62b301da26ebec28c4125df1cc7f37ed3c9666bd3230e9771be48851eaad0a"
    assert chain.entry_hash(entry, "ab" * 32) == expected
    row = {name: getattr(entry, name) for name in chain.COLUMNS}
    assert chain.row_hash(row, "ab" * 32) == expected
    entry.trace_id = None
    assert chain.entry_hash(entry, "ab" * 32) == expected


async def test_appended_rows_read_back_with_the_hash_they_were_inserted_with(
    any_engine: AsyncEngine,
) -> None:
    sessions = session_factory(any_engine)
    async with sessions() as session, session.begin():
        rows = [
            await chain.append_row(
                session, {name: getattr(an_entry(n), name) for name in chain.COLUMNS}
            )
            for n in range(1, 4)
        ]
        assert not session.new  # nothing for the ORM to flush
    assert [row["seq"] for row in rows] == [1, 2, 3]
    async with sessions() as session:
        stored = (await session.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))).all()
        result = await chain.verify(session)
    assert [(e.seq, e.prev_hash, e.hash) for e in stored] == [
        (row["seq"], row["prev_hash"], row["hash"]) for row in rows
    ]
    assert [e.data for e in stored] == [row["data"] for row in rows]
    assert (result.ok, result.entries, result.head) == (True, 3, rows[-1]["hash"])
