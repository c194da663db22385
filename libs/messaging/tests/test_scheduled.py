"""Scheduled outbox rows (``deliver_at``) against the real broker, on SQLite and PostgreSQL.

A scheduled row is never published before its time, then once, by whichever relay claims it
first; it holds up nothing behind it, survives a relay restart, and shows in the gauges. What
the relay published is read from a private queue bound to the test's exchange, with the time
each message arrived (the relay and the test read the same clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from tributary.messaging.bus import Bus
from tributary.messaging.db import OutboxLease, OutboxRow, session_factory, utcnow
from tributary.messaging.publisher import Publisher
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import delete_prefixed, isolated_settings, started_bus
from tributary.messaging.topology import Names
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.waiting import eventually

from .relay_support import (
    SERVICE,
    Capture,
    insert_rows,
    new_user,
    outbox_rows,
    raw_row,
    relay_with,
    row_of,
)

PERSON = "usr_sched0123456789"


class Arrivals(Capture):
    """A capture that also notes when each message arrived (naive UTC, as the relay's)."""

    def __init__(self, url: str, names: Names) -> None:
        super().__init__(url, names)
        self.arrived_at: dict[str, datetime] = {}

    async def __aenter__(self) -> Arrivals:
        await super().__aenter__()
        return self

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.arrived_at.setdefault(message.message_id or "", utcnow())
        await super()._on_message(message)


def in_seconds(seconds: float) -> datetime:
    """An aware UTC time ``seconds`` from now."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


def naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def ids_of(messages: Sequence[AbstractIncomingMessage]) -> list[str]:
    return [m.message_id or "" for m in messages]


async def add_events(bus: Bus, deliver_at: Sequence[datetime | None]) -> list[str]:
    """Commit one event per ``deliver_at`` (in that order) through the bus: its relay is told."""
    async with bus.unit_of_work() as uow:
        ids = [uow.outbox.add(new_user(), deliver_at=when).id for when in deliver_at]
        await uow.commit()
    return ids


async def write_events(engine: AsyncEngine, deliver_at: Sequence[datetime | None]) -> list[str]:
    """Commit events as another process would: no relay in this one is told."""
    async with UnitOfWork(session_factory(engine)(), f"/services/{SERVICE}") as uow:
        ids = [uow.outbox.add(new_user(), deliver_at=when).id for when in deliver_at]
        await uow.commit()
    return ids


@pytest.fixture
def relay_settings(broker_url: str) -> MessagingSettings:
    return isolated_settings(broker_url)


@pytest.fixture
async def connection(broker_url: str) -> AsyncIterator[AbstractConnection]:
    conn = await aio_pika.connect(broker_url)
    yield conn
    await conn.close()


@pytest.fixture
async def publisher(connection: AbstractConnection) -> AsyncIterator[Publisher]:
    publisher = Publisher(connection)
    await publisher.open()
    yield publisher
    await publisher.close()


# -- what Outbox.add stores ---------------------------------------------------------------------


async def test_deliver_at_is_stored_as_naive_utc_and_a_time_already_passed_means_at_once(
    engine: AsyncEngine,
) -> None:
    aware = in_seconds(3600).astimezone(timezone(timedelta(hours=-5)))
    naive_utc = naive(in_seconds(7200))
    ids = await write_events(engine, [aware, naive_utc, in_seconds(-5), None])

    stored = {r.event_id: r.deliver_at for r in await outbox_rows(engine)}

    assert [stored[i] for i in ids] == [naive(aware), naive_utc, None, None]


# -- the running relay ----------------------------------------------------------------------------


async def test_a_scheduled_event_is_published_once_when_due_never_before_and_blocks_nothing(
    engine: AsyncEngine, broker_url: str
) -> None:
    # a poll far away: only the row's own time can wake the relay for it
    bus = Bus(SERVICE, engine, settings=isolated_settings(broker_url, outbox_poll_seconds=30))
    async with Arrivals(broker_url, bus.names) as capture, started_bus(bus, consume=False):
        due = in_seconds(1.5)
        scheduled, immediate = await add_events(bus, [due, None])
        first = await capture.take(1, timeout=5)
        checked_at = utcnow()
        row = await row_of(engine, scheduled)
        assert ids_of(first) == [immediate]  # the row committed after it did not wait
        if checked_at < naive(due):  # (a machine stalled for 1.5 s proves nothing here)
            assert row.published_at is None
        await capture.take(2, timeout=10)
        received = await capture.flush()
    row = await row_of(engine, scheduled)

    assert ids_of(received) == [immediate, scheduled]
    assert capture.arrived_at[scheduled] >= naive(due)
    assert capture.arrived_at[scheduled] < naive(due) + timedelta(seconds=5)  # not the 30 s poll
    assert row.published_at is not None
    assert row.published_at >= naive(due)


async def test_due_rows_come_out_earliest_due_first_and_rows_due_together_in_commit_order(
    engine: AsyncEngine, broker_url: str, relay_settings: MessagingSettings
) -> None:
    bus = Bus(SERVICE, engine, settings=relay_settings)
    async with Arrivals(broker_url, bus.names) as capture, started_bus(bus, consume=False):
        later, sooner = in_seconds(1.2), in_seconds(0.4)
        a, b, c, d = await add_events(bus, [later, sooner, later, None])
        await capture.take(4, timeout=10)
        received = await capture.flush()

    assert ids_of(received) == [d, b, a, c]
    assert capture.arrived_at[b] >= naive(sooner)
    assert min(capture.arrived_at[a], capture.arrived_at[c]) >= naive(later)


async def test_rows_that_came_due_while_no_relay_ran_are_published_at_start_in_commit_order(
    engine: AsyncEngine, broker_url: str, relay_settings: MessagingSettings
) -> None:
    now = utcnow()
    rows = [raw_row() for _ in range(5)]
    for row, offset in zip(rows, (-10, -60, None, -30, 3600), strict=True):
        row.deliver_at = None if offset is None else now + timedelta(seconds=offset)
    await insert_rows(engine, rows)
    bus = Bus(SERVICE, engine, settings=relay_settings)
    async with Capture(broker_url, bus.names) as capture, started_bus(bus, consume=False):
        await capture.take(4)
        assert bus.relay is not None
        relay = bus.relay

        async def drained() -> bool:
            return (await relay.gauges()).waiting == 0

        await eventually(drained)
        received = await capture.flush()

    assert ids_of(received) == [r.event_id for r in rows[:4]]
    assert (await row_of(engine, rows[4].event_id)).published_at is None


async def test_a_scheduled_event_survives_a_relay_restart_and_is_published_once(
    engine: AsyncEngine, broker_url: str, relay_settings: MessagingSettings
) -> None:
    names = Names(relay_settings.name_prefix)
    try:
        async with Arrivals(broker_url, names) as capture:
            first = Bus(SERVICE, engine, settings=relay_settings)
            async with started_bus(first, consume=False, owns_topology=False):
                due = in_seconds(1.5)
                [scheduled] = await add_events(first, [due])
            # stopped before the row was due (on SQLite it handed its lease back)
            assert utcnow() < naive(due)
            assert (await row_of(engine, scheduled)).published_at is None
            second = Bus(SERVICE, engine, settings=relay_settings)
            async with started_bus(second, consume=False, owns_topology=False):
                await capture.take(1, timeout=10)
                received = await capture.flush()
            assert first.relay is not None
            assert second.relay is not None
            published = (first.relay.stats.published, second.relay.stats.published)
    finally:
        await delete_prefixed(broker_url, names, [])

    assert ids_of(received) == [scheduled]
    assert capture.arrived_at[scheduled] >= naive(due)
    assert published == (0, 1)


async def test_two_relays_on_one_database_publish_each_scheduled_event_once_when_due(
    engine: AsyncEngine, broker_url: str
) -> None:
    # small batches: the replicas claim often, on PostgreSQL side by side (SKIP LOCKED), on
    # SQLite in turn (the lease)
    settings = isolated_settings(broker_url, outbox_batch=10)
    replicas = [Bus(SERVICE, engine, settings=settings) for _ in range(2)]
    names = replicas[0].names
    try:
        async with Arrivals(broker_url, names) as capture:
            try:
                await asyncio.gather(*(bus.start(consume=False) for bus in replicas))
                # written by another process: the relays find them when they poll, then sleep
                # until each comes due
                due = [in_seconds(0.8 + 0.02 * n) for n in range(40)]
                scheduled = await write_events(engine, due)
                immediate = await write_events(engine, [None] * 20)
                await capture.take(60, timeout=20)
            finally:
                for bus in replicas:
                    await bus.stop()
            received = await capture.flush()  # anything sent twice would be in by now
    finally:
        await delete_prefixed(broker_url, names, [])

    message_ids = ids_of(received)
    assert len(message_ids) == 60, f"{len(message_ids) - len(set(message_ids))} duplicates"
    assert set(message_ids) == set(scheduled + immediate)
    assert all(capture.arrived_at[i] >= naive(when) for i, when in zip(scheduled, due, strict=True))
    assert sum(bus.relay.stats.published for bus in replicas if bus.relay is not None) == 60


# -- what the relay leaves alone, and what it reports ---------------------------------------------


async def test_the_gauges_count_scheduled_rows_and_how_long_the_oldest_due_one_is_overdue(
    engine: AsyncEngine, publisher: Publisher, relay_settings: MessagingSettings
) -> None:
    relay = relay_with(engine, publisher, relay_settings)
    empty = await relay.gauges()
    assert (empty.scheduled, empty.overdue_seconds, empty.waiting) == (0, 0.0, 0)

    now = utcnow()
    future_a, future_b, overdue, parked, fresh, published = (raw_row() for _ in range(6))
    future_a.deliver_at = now + timedelta(hours=1)
    future_b.deliver_at = now + timedelta(days=2)
    overdue.deliver_at = now - timedelta(seconds=90)
    overdue.created_at = now - timedelta(hours=5)  # it waits from when it came due
    parked.deliver_at, parked.parked_at = now - timedelta(hours=1), now
    fresh.created_at = now - timedelta(seconds=10)
    published.deliver_at, published.published_at = now - timedelta(hours=2), now
    await insert_rows(engine, [future_a, future_b, overdue, parked, fresh, published])

    gauges = await relay.gauges()

    assert gauges.scheduled == 2
    assert 90 <= gauges.overdue_seconds < 90 + 60
    assert gauges.waiting == 2  # overdue and fresh: the rows not due yet are not waiting
    assert gauges.oldest_waiting_age is not None
    assert 90 <= gauges.oldest_waiting_age < 90 + 60
    assert gauges.parked == 1
    assert (await relay.pending())[0] == 2


async def test_the_purge_keeps_unpublished_scheduled_rows_however_old(
    engine: AsyncEngine, publisher: Publisher, broker_url: str
) -> None:
    relay = relay_with(
        engine, publisher, isolated_settings(broker_url, outbox_replay_window_hours=1)
    )
    now = utcnow()
    waiting = raw_row(created_at=now - timedelta(days=30))
    waiting.deliver_at = now + timedelta(days=1)
    expired = raw_row(created_at=now - timedelta(days=30), published_at=now - timedelta(hours=2))
    expired.deliver_at = now - timedelta(hours=3)
    await insert_rows(engine, [waiting, expired])

    assert await relay.purge() == (1, 0)
    assert [r.event_id for r in await outbox_rows(engine)] == [waiting.event_id]


async def test_erasing_a_person_deletes_their_scheduled_rows_too(engine: AsyncEngine) -> None:
    theirs = new_user().model_copy(update={"user_id": PERSON})
    other = new_user().model_copy(update={"user_id": "usr_other0123456789"})
    async with UnitOfWork(session_factory(engine)(), f"/services/{SERVICE}") as uow:
        uow.outbox.add(theirs, deliver_at=in_seconds(3600))
        kept = uow.outbox.add(other, deliver_at=in_seconds(3600)).id
        await uow.commit()

    async with UnitOfWork(session_factory(engine)(), f"/services/{SERVICE}") as uow:
        deleted = await uow.purge_person_from_outbox(PERSON)
        await uow.commit()

    assert deleted == 1
    assert [r.event_id for r in await outbox_rows(engine)] == [kept]


# -- a property of the claim ----------------------------------------------------------------------

FAR = timedelta(hours=1)
"""Scheduled rows start this far ahead; each step of the test then brings some of them due."""
STEPS = 4


async def reschedule(
    engine: AsyncEngine, ranks: Sequence[int | None], ids: Sequence[str], step: int
) -> None:
    """As if the clock had moved on to ``step``: every unpublished scheduled row of rank ``r``
    is due ``step - r`` minutes (and a second) ago, or still ahead if ``r > step``; rows of
    equal rank get the same time, their order by rank is kept."""
    now = utcnow()
    async with session_factory(engine)() as session, session.begin():
        for event_id, rank in zip(ids, ranks, strict=True):
            if rank is None:
                continue
            await session.exec(
                update(OutboxRow)
                .where(col(OutboxRow.event_id) == event_id, col(OutboxRow.published_at).is_(None))
                .values(deliver_at=now + timedelta(minutes=rank - step, seconds=-1))
            )


def expected_batches(
    ranks: Sequence[int | None], done: set[int], step: int, batch: int
) -> list[list[int]]:
    """The claim's rule: due scheduled rows first (earliest due, then commit order), then rows
    to publish at once (commit order), ``batch`` at most; each batch goes out in commit order."""
    due = sorted(
        (rank, n)
        for n, rank in enumerate(ranks)
        if n not in done and rank is not None and rank <= step
    )
    at_once = [n for n, rank in enumerate(ranks) if n not in done and rank is None]
    batches: list[list[int]] = []
    while due or at_once:
        taken = [n for _, n in due[:batch]]
        due = due[batch:]
        room = batch - len(taken)
        taken += at_once[:room]
        at_once = at_once[room:]
        batches.append(sorted(taken))
    return batches


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ranks=st.lists(st.none() | st.integers(0, STEPS - 1), min_size=1, max_size=12),
    batch=st.integers(1, 4),
)
async def test_every_row_comes_out_once_never_early_due_rows_first_each_batch_in_commit_order(
    engine: AsyncEngine,
    publisher: Publisher,
    broker_url: str,
    relay_settings: MessagingSettings,
    ranks: list[int | None],
    batch: int,
) -> None:
    async with session_factory(engine)() as session, session.begin():
        await session.exec(delete(OutboxRow))
        await session.exec(delete(OutboxLease))  # the relay of the last example held it
    far = datetime.now(UTC) + FAR
    ids = await write_events(
        engine, [None if rank is None else far + timedelta(minutes=rank) for rank in ranks]
    )
    names = Names(relay_settings.name_prefix)
    relay = relay_with(
        engine,
        publisher,
        isolated_settings(broker_url, name_prefix=names.prefix, outbox_batch=batch),
    )
    done: set[int] = set()
    try:
        async with Capture(broker_url, names) as capture:
            for step in range(STEPS):
                await reschedule(engine, ranks, ids, step)
                expected = expected_batches(ranks, done, step, batch)
                batches: list[list[int]] = []
                while published := await relay.drain_once():
                    seen = sum(len(b) for b in batches) + len(done)
                    arrived = await capture.take(seen + published)
                    batches.append([ids.index(i) for i in ids_of(arrived[seen:])])
                assert batches == expected, f"step {step}"
                done.update(n for b in batches for n in b)
                # never early: exactly the rows due by this step have come out
                assert done == {n for n, r in enumerate(ranks) if r is None or r <= step}
            received = await capture.flush()
    finally:
        await delete_prefixed(broker_url, names, [])

    assert sorted(ids_of(received)) == sorted(ids)  # each exactly once
