"""The relay keeps going: failed steps retried and counted, a dead loop restarted, stalls
reported, rows that keep failing parked, purges in chunks (SQLite and PostgreSQL, real broker).

Faults are injected where they happen: a database statement of one step fails (an SQLAlchemy
hook raises, as the driver would), or the publisher raises as it does for a broker outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import insert
from sqlalchemy.event import listen, remove
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from tributary.messaging.db import utcnow
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.publisher import Publisher
from tributary.messaging.relay import OutboxRelay, RelayPolicy, Step
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import delete_prefixed, isolated_settings
from tributary.messaging.topology import Names
from tributary.testkit.waiting import eventually

from .relay_support import (
    Capture,
    commit_events,
    insert_rows,
    new_user,
    outbox_rows,
    raw_row,
    relay_with,
    row_of,
    supervised,
)

OUTBOX = SQLModel.metadata.tables["tributary_outbox"]
INBOX = SQLModel.metadata.tables["tributary_inbox"]
QUICK = RelayPolicy(step_backoff_seconds=0.02, step_backoff_max_seconds=0.2)


@pytest.fixture
def settings(broker_url: str) -> MessagingSettings:
    return isolated_settings(broker_url, outbox_poll_seconds=0.2)


@pytest.fixture
async def publisher(broker_url: str, settings: MessagingSettings) -> AsyncIterator[Publisher]:
    connection = await aio_pika.connect(broker_url)
    publisher = Publisher(connection, timeout=10)
    await publisher.open()
    yield publisher
    await connection.close()
    await delete_prefixed(broker_url, Names(settings.name_prefix), [])


class StatementFault:
    """The next ``times`` statements that ``matches`` fail as a lost database would fail them."""

    def __init__(self, engine: AsyncEngine, matches: Callable[[str], bool], times: int) -> None:
        self._engine = engine.sync_engine
        self._matches = matches
        self.remaining = times
        self.raised = 0

    def __enter__(self) -> StatementFault:
        listen(self._engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *exc_info: object) -> None:
        remove(self._engine, "before_cursor_execute", self._before)

    def _before(self, _conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if self.remaining and self._matches(statement):
            self.remaining -= 1
            self.raised += 1
            raise OperationalError(statement, params, ConnectionError("injected fault"))


class FlakyPublisher:
    """Wraps a publisher: the first ``times`` publishes fail as a broker outage does."""

    def __init__(self, publisher: Publisher, times: int) -> None:
        self._publisher = publisher
        self.remaining = times

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        if self.remaining:
            self.remaining -= 1
            raise InfrastructureError("broker", "injected: connection closed")
        await self._publisher.publish(exchange, routing_key, message)


STATEMENTS: dict[Step, Callable[[str], bool]] = {
    "claim": lambda s: s.startswith("SELECT") and "FROM tributary_outbox" in s and "LIMIT" in s,
    "mark": lambda s: s.startswith("UPDATE tributary_outbox SET published_at"),
    "purge": lambda s: s.startswith("DELETE FROM tributary_outbox"),
}


@contextmanager
def fault_in(step: Step, relay: OutboxRelay, engine: AsyncEngine, times: int) -> Iterator[None]:
    if step == "publish":
        flaky = FlakyPublisher(relay._publisher, times)
        relay._publisher = flaky  # type: ignore[assignment]
        yield
        return
    with StatementFault(engine, STATEMENTS[step], times):
        yield


@pytest.mark.parametrize("step", ["claim", "publish", "mark", "purge"])
async def test_a_failing_step_is_retried_and_counted_and_every_event_is_published_once(
    step: Step,
    engine: AsyncEngine,
    broker_url: str,
    publisher: Publisher,
) -> None:
    settings = isolated_settings(broker_url, outbox_poll_seconds=0.2, outbox_purge_seconds=0.1)
    relay = relay_with(engine, publisher, settings, QUICK)
    now = utcnow()
    expired = [raw_row(created_at=now - timedelta(days=9), published_at=now - timedelta(days=8))]
    await insert_rows(engine, expired)
    async with Capture(broker_url, Names(settings.name_prefix)) as capture:
        with fault_in(step, relay, engine, times=3):
            ids = await commit_events(engine, [new_user() for _ in range(5)])
            async with supervised(relay) as task:
                await capture.take(5)

                async def recovered() -> bool:
                    rows = {r.event_id: r for r in await outbox_rows(engine)}
                    published = all(rows[i].published_at is not None for i in ids)
                    return published and expired[0].event_id not in rows

                await eventually(recovered, what=f"recovery from {step} failures")
                assert not task.done()
        received = await capture.flush()

    assert sorted(m.message_id or "" for m in received) == sorted(ids)  # none twice
    failures = relay.stats.step_failures
    assert failures[step] >= (1 if step == "publish" else 3)
    assert all(count == 0 for other, count in failures.items() if other != step)
    assert relay.stats.restarts == 0
    assert relay.healthy


async def test_supervise_restarts_a_relay_loop_that_raised(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings, publisher: Publisher
) -> None:
    relay = relay_with(engine, publisher, settings, QUICK)
    original = relay.run
    calls = 0

    async def dies_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("unexpected")
        await original()

    relay.run = dies_once  # type: ignore[method-assign]
    async with Capture(broker_url, Names(settings.name_prefix)) as capture:
        ids = await commit_events(engine, [new_user() for _ in range(3)])
        async with supervised(relay) as task:
            received = await capture.take(3)
            assert not task.done()

    assert [m.message_id for m in received] == ids
    assert relay.stats.restarts == 1
    assert calls == 2
    assert "RuntimeError: unexpected" in (relay.stats.last_error or "")


async def test_a_purge_that_blows_up_outside_the_retried_steps_ends_the_loop_and_is_restarted(
    engine: AsyncEngine, broker_url: str, publisher: Publisher
) -> None:
    settings = isolated_settings(broker_url, outbox_poll_seconds=0.1, outbox_purge_seconds=0.05)
    relay = relay_with(engine, publisher, settings, QUICK)
    original = relay._purge_round
    blown = 0

    async def blows_up_once() -> bool:
        nonlocal blown
        if not blown:
            blown += 1
            raise MemoryError("not a step failure: nothing in run() expects this")
        return await original()

    relay._purge_round = blows_up_once  # type: ignore[method-assign]
    async with (
        Capture(broker_url, Names(settings.name_prefix)) as capture,
        supervised(relay) as task,
    ):

        async def restarted() -> bool:
            return relay.stats.restarts >= 1

        await eventually(restarted, what="a restart")
        ids = await commit_events(engine, [new_user()])
        relay.notify()
        received = await capture.take(1)
        assert not task.done()

    assert [m.message_id for m in received] == ids
    assert relay.stats.restarts == 1


async def test_a_loop_that_returns_without_stop_is_restarted_and_stop_ends_supervision(
    engine: AsyncEngine, settings: MessagingSettings, publisher: Publisher
) -> None:
    relay = relay_with(engine, publisher, settings, QUICK)
    original = relay.run
    calls = 0

    async def returns_early() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            await original()

    relay.run = returns_early  # type: ignore[method-assign]
    task = asyncio.create_task(relay.supervise())

    async def second_run() -> bool:
        return calls == 2

    await eventually(second_run)
    relay.stop()
    await asyncio.wait_for(task, 10)

    assert relay.stats.restarts == 1


async def test_health_reports_a_stalled_relay_with_rows_waiting_and_recovers(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings, publisher: Publisher
) -> None:
    policy = RelayPolicy(step_backoff_seconds=0.02, step_backoff_max_seconds=0.1, stall_seconds=0.5)
    relay = relay_with(engine, publisher, settings, policy)
    assert await relay.health() == (True, None)
    broken = FlakyPublisher(publisher, times=10**9)
    relay._publisher = broken  # type: ignore[assignment]
    async with Capture(broker_url, Names(settings.name_prefix)) as capture:
        await commit_events(engine, [new_user() for _ in range(2)])
        async with supervised(relay):
            seen: list[tuple[bool, str | None]] = []

            async def unhealthy() -> bool:
                failed = relay.stats.step_failures["publish"] > 0  # read before health awaits
                seen.append(await relay.health())
                return failed and not seen[-1][0]

            await eventually(unhealthy, what="the stall reported")
            broken.remaining = 0  # the broker is back

            async def healthy() -> bool:
                return await relay.health() == (True, None)

            await eventually(healthy, what="health after recovery")
            await capture.take(2)

    _, reason = seen[-1]
    assert reason is not None
    assert "2 rows waiting" in reason
    assert "publish: InfrastructureError" in reason
    assert relay.stats.step_failures["publish"] >= 1


async def test_health_ignores_an_idle_relay_with_nothing_waiting(
    engine: AsyncEngine, settings: MessagingSettings, publisher: Publisher
) -> None:
    relay = relay_with(engine, publisher, settings, RelayPolicy(stall_seconds=0.0))
    # no batch ever ran (as good as stalled), but nothing waits: nothing to report
    await insert_rows(engine, [raw_row(published_at=utcnow())])

    assert await relay.health() == (True, None)


async def test_a_row_in_backoff_waits_its_delay_without_holding_up_later_rows(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings, publisher: Publisher
) -> None:
    policy = RelayPolicy(row_retry_seconds=60, step_backoff_seconds=0.02)
    relay = relay_with(engine, publisher, settings, policy)
    orphan = raw_row("nobody.listens.v1")
    async with Capture(broker_url, Names(settings.name_prefix), ["user.created.*"]) as capture:
        before = utcnow()
        await insert_rows(engine, [orphan])
        first = await commit_events(engine, [new_user()])
        async with supervised(relay):
            await capture.take(1)

            async def charged() -> bool:
                return (await row_of(engine, orphan.event_id)).attempts == 1

            await eventually(charged)
            after = utcnow()
            later = await commit_events(engine, [new_user() for _ in range(3)])
            relay.notify()
            received = await capture.take(4)
    row = await row_of(engine, orphan.event_id)

    assert [m.message_id for m in received] == first + later
    assert row.attempts == 1  # not tried again within its delay
    assert row.parked_at is None
    assert row.next_attempt_at is not None
    assert before + timedelta(seconds=60) <= row.next_attempt_at <= after + timedelta(seconds=60)
    assert "no queue bound" in (row.last_error or "")


async def test_an_unroutable_row_is_parked_after_its_attempts_and_blocks_nothing(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings, publisher: Publisher
) -> None:
    policy = RelayPolicy(max_attempts=3, row_retry_seconds=0.02, step_backoff_seconds=0.02)
    relay = relay_with(engine, publisher, settings, policy)
    orphan = raw_row("nobody.listens.v1")
    async with Capture(broker_url, Names(settings.name_prefix), ["user.created.*"]) as capture:
        await insert_rows(engine, [orphan])
        ids = await commit_events(engine, [new_user() for _ in range(2)])
        async with supervised(relay):

            async def parked() -> bool:
                return (await row_of(engine, orphan.event_id)).parked_at is not None

            await eventually(parked, what="the row parked")
            ids += await commit_events(engine, [new_user() for _ in range(2)])
            relay.notify()
            received = await capture.take(4)

            async def marked() -> bool:  # the confirms came; the marks commit right after
                return (await relay.gauges()).waiting == 0

            await eventually(marked)
            gauges = await relay.gauges()
    row = await row_of(engine, orphan.event_id)

    assert [m.message_id for m in received] == ids
    assert row.attempts == 3  # parked: not tried again while later rows went out
    assert row.published_at is None
    assert row.next_attempt_at is None
    assert "no queue bound" in (row.last_error or "")
    assert relay.stats.parked == 1
    assert relay.stats.unroutable == 3
    assert gauges.parked == 1
    assert gauges.waiting == 0
    assert gauges.oldest_waiting_age is None
    assert gauges.last_publish_at is not None
    assert await relay.pending() == (0, None)


class Deletes:
    """Counts DELETE statements per table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.sync_engine
        self.count: dict[str, int] = {}

    def __enter__(self) -> Deletes:
        listen(self._engine, "after_cursor_execute", self._executed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        remove(self._engine, "after_cursor_execute", self._executed)

    def _executed(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("DELETE FROM "):
            table = statement.split()[2]
            self.count[table] = self.count.get(table, 0) + 1


async def bulk_insert(engine: AsyncEngine, table: Any, rows: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(table), rows)


async def test_purge_deletes_in_chunks_outside_the_replay_window_and_the_inbox_retention(
    engine: AsyncEngine, connection: AbstractConnection, broker_url: str
) -> None:
    # the defaults: outbox rows kept 7 days after publishing, inbox rows 14 days
    settings = isolated_settings(broker_url, purge_chunk=1000)
    assert settings.outbox_replay_window_hours == 7 * 24
    assert settings.inbox_retention_days == 14
    relay = relay_with(engine, Publisher(connection), settings)
    now = utcnow()

    def outbox(n: int, published_days_ago: float | None, prefix: str) -> list[dict[str, Any]]:
        published = None if published_days_ago is None else now - timedelta(published_days_ago)
        return [
            {
                "event_id": f"{prefix}-{i}",
                "routing_key": "user.created.v2",
                "body": b"{}",
                "trace_headers": "{}",
                "created_at": now - timedelta(days=30),
                "published_at": published,
                "attempts": 0,
            }
            for i in range(n)
        ]

    def inbox(n: int, days_ago: float, prefix: str) -> list[dict[str, Any]]:
        return [
            {
                "key": f"{prefix}-{i}",
                "payload_hash": "0" * 64,
                "event_id": f"{prefix}-{i}",
                "event_type": "com.tributary.user.created.v2",
                "processed_at": now - timedelta(days=days_ago),
            }
            for i in range(n)
        ]

    await bulk_insert(engine, OUTBOX, outbox(2500, 8, "old") + outbox(10, 6, "kept"))
    await bulk_insert(engine, OUTBOX, outbox(5, None, "waiting"))
    await bulk_insert(engine, INBOX, inbox(2500, 15, "old") + inbox(10, 13, "kept"))

    with Deletes(engine) as deletes:
        purged = await relay.purge()

    assert purged == (2500, 2500)
    assert deletes.count == {"tributary_outbox": 3, "tributary_inbox": 3}
    left = await outbox_rows(engine)
    assert sorted(r.event_id.split("-")[0] for r in left) == ["kept"] * 10 + ["waiting"] * 5
    async with engine.connect() as conn:
        keys = (await conn.execute(INBOX.select())).all()
    assert sorted(k.key.split("-")[0] for k in keys) == ["kept"] * 10
    assert (relay.stats.purged, relay.stats.inbox_purged) == (2500, 2500)


@pytest.fixture
async def connection(broker_url: str) -> AsyncIterator[AbstractConnection]:
    conn = await aio_pika.connect(broker_url)
    yield conn
    await conn.close()


@given(st.integers(min_value=1, max_value=60))
def test_row_delays_double_from_the_first_and_stop_at_the_cap(attempts: int) -> None:
    policy = RelayPolicy(row_retry_seconds=2, row_retry_max_seconds=300)

    delay = policy.row_delay(attempts)

    assert 2 <= delay <= 300
    assert delay == min(2 * 2 ** (attempts - 1), 300)
    assert policy.row_delay(attempts + 1) >= delay


class StoppingPublisher:
    """Wraps a publisher: the relay is told to stop while its batch is being published."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self.relay: OutboxRelay | None = None

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        assert self.relay is not None
        self.relay.stop()
        await self._publisher.publish(exchange, routing_key, message)


async def test_a_stop_during_a_batch_ends_the_relay_at_once_and_frees_the_lease(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings, publisher: Publisher
) -> None:
    slow_poll = isolated_settings(
        broker_url, name_prefix=settings.name_prefix, outbox_poll_seconds=30
    )
    stopping = StoppingPublisher(publisher)
    relay = relay_with(engine, stopping, slow_poll)  # type: ignore[arg-type]
    stopping.relay = relay
    async with Capture(broker_url, Names(settings.name_prefix)) as capture:
        [first] = await commit_events(engine, [new_user()])

        # the batch finishes, then the loop ends: it does not sleep until its next poll
        await asyncio.wait_for(relay.supervise(), timeout=5)
        assert relay.stats.published == 1

        # on SQLite the lease was handed back: a replacement publishes at once, not in 15 s
        [second] = await commit_events(engine, [new_user()])
        assert await relay_with(engine, publisher, slow_poll).drain_once() == 1
        received = await capture.take(2)

    assert [m.message_id for m in received] == [first, second]
