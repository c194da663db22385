"""The event store on SQLite and PostgreSQL: appends with an expected version, conflicts,
positions in commit order, append-only rows, and stored events upcast as they are read."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing.events import CURRENT_VERSIONS
from tributary.billing.eventstore import ConcurrencyConflict, EventStore, NewEvent
from tributary.billing.upcasting import UPCASTERS, Upcasters
from tributary.contracts.upcasting import NoUpcastPath, UpcastFailed

STORE = EventStore(UPCASTERS, CURRENT_VERSIONS)


def note(n: int) -> NewEvent:
    return NewEvent("Noted", {"n": n}, 1, {"correlation_id": "c-1"})


async def test_appends_follow_the_expected_version_and_a_stale_writer_gets_a_conflict(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        first = await STORE.append(session, "sub_a", 0, [note(1), note(2)])
        await session.commit()
    assert [(e.version, e.data["n"]) for e in first] == [(1, 1), (2, 2)]
    assert first[0].metadata == {"correlation_id": "c-1"}

    # two writers read version 2; the first appends, the second is told it is stale
    async with sessions() as one, sessions() as two:
        assert await STORE.version_of(one, "sub_a") == await STORE.version_of(two, "sub_a") == 2
        await STORE.append(one, "sub_a", 2, [note(3)])
        await one.commit()
        with pytest.raises(ConcurrencyConflict) as conflict:
            await STORE.append(two, "sub_a", 2, [note(99)])
        assert (conflict.value.expected, conflict.value.actual) == (2, 3)
        await two.rollback()
    with pytest.raises(ConcurrencyConflict):
        async with sessions() as session:
            await STORE.append(session, "sub_a", 0, [note(0)])  # "a new stream": it is not
    async with sessions() as session:
        stream = await STORE.read_stream(session, "sub_a")
        assert [e.version for e in stream] == [1, 2, 3]
        assert await STORE.append(session, "sub_a", 1, []) == []  # nothing to append: no check


async def test_concurrent_appends_get_positions_in_commit_order(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async def writer(stream: str) -> None:
        for n in range(5):
            async with sessions() as session:
                version = await STORE.version_of(session, stream)
                await STORE.append(session, stream, version, [note(n)])
                await session.commit()

    await asyncio.gather(*(writer(f"sub_{k}") for k in "bcdef"))
    async with sessions() as session:
        everything = await STORE.read_all(session)
        assert len(everything) == 25
        positions = [e.position for e in everything]
        assert positions == sorted(positions)
        assert await STORE.head(session) == positions[-1]
        page = await STORE.read_all(session, after=positions[9], limit=5)
        assert [e.position for e in page] == positions[10:15]
        for stream in "bcdef":
            versions = [e.version for e in await STORE.read_stream(session, f"sub_{stream}")]
            assert versions == [1, 2, 3, 4, 5]


async def test_stored_events_cannot_be_changed_or_deleted(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        await STORE.append(session, "sub_g", 0, [note(1)])
        await session.commit()
    for statement in (
        "UPDATE event_store SET type = 'Changed'",
        "DELETE FROM event_store",
    ):
        async with sessions() as session:
            with pytest.raises(DBAPIError, match="append-only"):
                await session.exec(text(statement))  # type: ignore[call-overload]
            await session.rollback()
    async with sessions() as session:
        assert [e.type for e in await STORE.read_stream(session, "sub_g")] == ["Noted"]


async def test_a_v1_event_is_stored_as_it_was_and_read_as_v2(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """SubscriptionRequested v1 had no currency (every plan cost euros); v2 names it."""
    v1 = {
        "user": {"key_id": "dk_x", "ciphertext": "AAAA"},
        "plan": "starter",
        "amount_cents": 900,
        "requested_at": datetime.now(UTC).isoformat(),
    }
    async with sessions() as session:
        await STORE.append(session, "sub_old", 0, [NewEvent("SubscriptionRequested", v1, 1)])
        await session.commit()
    async with sessions() as session:
        [event] = await STORE.read_stream(session, "sub_old")
        assert (event.schema_version, event.data) == (2, {**v1, "currency": "EUR"})
        row = (
            await session.exec(  # type: ignore[call-overload]
                text("SELECT schema_version, data FROM event_store WHERE stream_id = 'sub_old'")
            )
        ).one()
    stored = row.data if isinstance(row.data, dict) else json.loads(row.data)
    assert (row.schema_version, stored) == (1, v1)  # the row itself never changes


def test_upcasters_refuse_what_they_cannot_do() -> None:
    registry = Upcasters()

    @registry.register("Thing", 1)
    def broken(data: dict[str, object]) -> dict[str, object]:
        raise KeyError("field")

    with pytest.raises(UpcastFailed):
        registry.upcast("Thing", 1, {}, 2)
    with pytest.raises(NoUpcastPath):
        registry.upcast("Thing", 2, {}, 3)
    with pytest.raises(NoUpcastPath):
        registry.upcast("Thing", 3, {}, 2)
    with pytest.raises(ValueError, match="registered"):
        registry.register("Thing", 1)(broken)
