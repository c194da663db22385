"""Process-level faults: a consumer that crashes, is killed or is stopped, a relay killed while
scheduled rows wait, and a broker restart.

The consumer under test runs in its own process (``fault_worker.py``), so a crash or a SIGKILL
is real: no ``finally``, no ack, and the broker takes back whatever was in flight. Every test
ends by counting what the database committed and what the broker still holds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel, col, func, select

from libs.contracts.tests.samples import sample
from tributary.contracts.envelope import CloudEvent, new_event
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.db import InboxRow, OutboxRow, session_factory
from tributary.messaging.publisher import Publisher, event_message
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import (
    OutcomeRecorder,
    announced_dead_letters,
    delete_prefixed,
    isolated_settings,
    queue_depth,
    read_queue,
)
from tributary.messaging.topology import Names, QueueSet, declare_queue_set
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.nodes import RabbitNode
from tributary.testkit.waiting import eventually

from .conftest import Thing, on_user_created
from .fault_worker import CRASH_MARKER, READY, STANDBY, FaultThing, create_tables
from .relay_support import Capture, outbox_rows

WORKER = Path(__file__).with_name("fault_worker.py")
SERVICE = "faulty"
STREAM = 2_000
ONLY_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ONLY_POSTGRES = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


# -- events ----------------------------------------------------------------------------------


def new_user_id(marker: str = "usr_") -> str:
    return f"{marker}{uuid.uuid4().hex[:16]}"


def user_created(user_id: str) -> CloudEvent[UserCreatedV2]:
    payload = UserCreatedV2.model_validate(sample("user.created.v2", user_id=user_id))
    return new_event(routing_key=payload.routing_key, source="/tests/faults", data=payload)


async def publish(url: str, names: Names, events: Sequence[CloudEvent[UserCreatedV2]]) -> None:
    """Publish as another service's relay would: persistent, confirmed, many in flight."""
    connection = await aio_pika.connect(url)
    try:
        publisher = Publisher(connection)
        await publisher.open()
        await asyncio.gather(
            *(
                publisher.publish(
                    names.exchange,
                    e.routing_key,
                    event_message(
                        e.to_bytes(),
                        event_id=e.id,
                        routing_key=e.routing_key,
                        app_id="fault-tests",
                        correlation_id=e.correlationid,
                        timestamp=e.time,
                    ),
                )
                for e in events
            )
        )
    finally:
        await connection.close()


# -- the consumer process --------------------------------------------------------------------


class Worker:
    """One ``fault_worker.py`` process; its output is kept for failure messages."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.command: list[str] = []
        self.lines: list[str] = []
        self.started = False
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.exited = asyncio.create_task(process.wait())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if line == READY:
                self._ready.set()

    def output(self) -> str:
        return "\n".join(["worker output (last 30 lines):", *self.lines[-30:]])

    @property
    def running(self) -> bool:
        return not self.exited.done()

    async def go(self) -> None:
        """Hand the warm process its command line: it connects and consumes."""
        assert self.process.stdin is not None
        assert self.command
        self.started = True
        self.process.stdin.write(json.dumps(self.command).encode() + b"\n")
        await self.process.stdin.drain()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({ready, self.exited}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            ready.cancel()
        assert self._ready.is_set(), f"the worker never got ready\n{self.output()}"

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code (the grace period is a few seconds; this waits longer)."""
        if self.running:
            self.process.terminate()
        return await self._exit_code(timeout)

    async def kill(self) -> None:
        if self.running:
            self.process.kill()
        await self._exit_code(60.0)

    async def _exit_code(self, timeout: float) -> int:
        done, _ = await asyncio.wait({self.exited}, timeout=timeout)
        assert done, f"the worker did not exit within {timeout} s\n{self.output()}"
        await self._reader
        if self.process.stdin is not None:
            self.process.stdin.close()
        return self.exited.result()


class WarmPool:
    """Worker processes that have done their imports and wait for a command line.

    Importing the runtime costs seconds of CPU per process. Warming the next one while a test
    runs keeps the file fast, and a restart then costs what it does under a supervisor.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._warm: list[Worker] = []
        self._taken: list[Worker] = []

    async def take(self) -> Worker:
        while len(self._warm) <= self._size:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                STANDBY,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            self._warm.append(Worker(process))
        worker = self._warm.pop(0)
        self._taken.append(worker)
        return worker

    async def close(self) -> None:
        for worker in self._warm + self._taken:
            await worker.kill()


@pytest.fixture(scope="module")
async def warm_pool() -> AsyncIterator[WarmPool]:
    pool = WarmPool(size=1)
    try:
        yield pool
    finally:
        await pool.close()


@dataclass
class Consumers:
    """Consumer processes of one service on the test's database and topology."""

    pool: WarmPool
    database_url: str
    settings: MessagingSettings
    names: Names
    queues: QueueSet
    workers: list[Worker] = field(default_factory=list)

    async def prepare(
        self, mode: str = "slow", *, delay_ms: float = 1.0, delivery_limit: int = 10
    ) -> Worker:
        """A warm process that starts consuming on :meth:`Worker.go`."""
        worker = await self.pool.take()
        worker.command = [
            *("--db", self.database_url, "--broker", self.settings.rabbitmq_url),
            *("--prefix", self.names.prefix, "--service", SERVICE, "--mode", mode),
            *("--delay-ms", str(delay_ms), "--delivery-limit", str(delivery_limit)),
        ]
        self.workers.append(worker)
        return worker

    async def start(self, mode: str = "slow", **options: Any) -> Worker:
        worker = await self.prepare(mode, **options)
        await worker.go()
        return worker

    @property
    def started(self) -> list[Worker]:
        return [w for w in self.workers if w.started]

    async def stop_all(self) -> None:
        """Graceful stop of every running worker (each must exit 0); spares are killed."""
        for worker in self.workers:
            if not worker.started:
                await worker.kill()
            elif worker.running:
                assert await worker.terminate() == 0, worker.output()

    async def declare_topology(self, delivery_limit: int) -> None:
        """What the worker declares at start, declared ahead so that events can wait for it."""
        connection = await aio_pika.connect(self.settings.rabbitmq_url)
        try:
            await declare_queue_set(
                connection,
                self.names,
                self.queues,
                binding_keys=["user.created.*"],
                tier_seconds=self.settings.retry_tiers,
                delivery_limit=delivery_limit,
            )
        finally:
            await connection.close()


@pytest.fixture
async def consumers(
    warm_pool: WarmPool, database_url: str, engine: AsyncEngine, broker_url: str
) -> AsyncIterator[Consumers]:
    settings = isolated_settings(broker_url)
    names = Names(settings.name_prefix)
    queues = names.service_queues(SERVICE, len(settings.retry_tiers))
    await create_tables(engine)
    spawned = Consumers(warm_pool, database_url, settings, names, queues)
    try:
        yield spawned
    finally:
        for worker in spawned.workers:
            await worker.kill()
        await delete_prefixed(broker_url, names, [queues.work, queues.dlq, *queues.retries])


# -- waiting and counting --------------------------------------------------------------------


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    what: str,
    timeout: float = 60.0,
    while_alive: Worker | None = None,
) -> bool:
    """True once ``check()`` holds; False if ``while_alive`` exits first; fails on timeout."""
    died = False

    async def done_or_died() -> bool:
        nonlocal died
        if await check():
            return True
        died = while_alive is not None and not while_alive.running
        return died

    await eventually(done_or_died, timeout=timeout, what=what, poll=0.1)
    return not died


async def count(engine: AsyncEngine, table: type[SQLModel]) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def handled_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(col(FaultThing.event_id)))).scalars())


async def assert_each_handled_once(
    engine: AsyncEngine, consumers: Consumers, events: Sequence[CloudEvent[UserCreatedV2]]
) -> None:
    """One row and one inbox entry per event; once stopped, the broker holds nothing."""
    ids = await handled_ids(engine)
    assert len(ids) == len(events)
    assert set(ids) == {e.id for e in events}
    assert await count(engine, InboxRow) == len(events)
    await consumers.stop_all()  # unacked deliveries would now be back in the work queue
    url, qs = consumers.settings.rabbitmq_url, consumers.queues
    assert await queue_depth(url, qs.work) == 0
    assert [await queue_depth(url, q) for q in qs.retries] == [0] * len(qs.retries)
    assert await queue_depth(url, qs.dlq) == 0


# -- a poison message that kills the consumer ------------------------------------------------


@ONLY_SQLITE
async def test_a_message_that_kills_its_consumer_ends_in_the_dlq_and_the_others_are_handled(
    consumers: Consumers, engine: AsyncEngine, broker_url: str
) -> None:
    limit = 2
    poison = user_created(new_user_id(CRASH_MARKER))
    good = [user_created(new_user_id()) for _ in range(5)]
    # all in the queue before the first delivery: the consumer holds them all at each crash
    await consumers.declare_topology(delivery_limit=limit)
    await publish(broker_url, consumers.names, [*good[:2], poison, *good[2:]])
    worker = await consumers.start("crash", delivery_limit=limit)
    spare = await consumers.prepare("crash", delivery_limit=limit)

    async def every_event_came_to_rest() -> bool:
        dead = await queue_depth(broker_url, consumers.queues.dlq)
        return dead >= 1 and dead + await count(engine, FaultThing) == 1 + len(good)

    while not await wait_until(
        every_event_came_to_rest, what="the DLQ and the database", while_alive=worker
    ):
        assert await worker.exited == 1, worker.output()
        assert len(consumers.started) <= 10, "endless crash loop: no delivery limit?"
        worker, spare = spare, await consumers.prepare("crash", delivery_limit=limit)
        await worker.go()

    await spare.kill()
    exit_codes = [await w.terminate() for w in consumers.started]
    # handed back delivery_limit times; the delivery after that (the broker's last) the
    # runtime dead-letters before handling it, and announces it
    assert exit_codes.count(1) == limit, exit_codes
    [announced] = await announced_dead_letters(engine)
    assert announced.data["reason"] == "delivery_limit"
    assert announced.data["message_id"] == poison.id
    assert announced.data["attempts"] == limit
    dead = await read_queue(
        broker_url, consumers.queues.dlq, expect=await queue_depth(broker_url, consumers.queues.dlq)
    )
    reasons = {m.message_id: m.reason for m in dead}
    assert reasons.get(poison.id) == "delivery_limit"
    innocent = sorted(str(m.message_id) for m in dead if m.message_id != poison.id)
    assert innocent == [], (
        f"{len(innocent)} of {len(good)} good events were dead-lettered with the poison message "
        f"(reasons {sorted({str(reasons.get(i)) for i in innocent})}): every crash "
        "charged a delivery to each message the consumer held, not only to the one it handled"
    )
    await assert_each_handled_once(engine, consumers, good)


# -- a consumer killed or stopped in the middle of a batch -----------------------------------


async def test_a_consumer_killed_mid_batch_loses_nothing_and_handles_nothing_twice(
    consumers: Consumers, engine: AsyncEngine, broker_url: str
) -> None:
    events = [user_created(new_user_id()) for _ in range(STREAM)]
    worker = await consumers.start("slow")
    replacement = await consumers.prepare("slow")
    await worker.wait_ready()
    await publish(broker_url, consumers.names, events)
    await wait_until(lambda: _more_than(engine, 200), what="200 handled events", while_alive=worker)

    await worker.kill()
    assert await count(engine, FaultThing) < STREAM, "killed too late to be mid-stream"
    await replacement.go()
    await replacement.wait_ready()
    await wait_until(
        lambda: _more_than(engine, STREAM - 1), what=f"{STREAM} handled events", timeout=120
    )
    await assert_each_handled_once(engine, consumers, events)


async def test_a_consumer_stopped_mid_batch_finishes_it_hands_back_the_rest_and_exits_0(
    consumers: Consumers, engine: AsyncEngine, broker_url: str
) -> None:
    events = [user_created(new_user_id()) for _ in range(STREAM)]
    worker = await consumers.start("slow")
    replacement = await consumers.prepare("slow")
    await worker.wait_ready()
    await publish(broker_url, consumers.names, events)
    await wait_until(lambda: _more_than(engine, 200), what="200 handled events", while_alive=worker)

    before = await count(engine, FaultThing)
    assert await worker.terminate() == 0, worker.output()
    handled = await count(engine, FaultThing)
    # the batch in hand (if any) was committed, and the stop came before the end of the stream
    assert before <= handled < STREAM, "stopped too late to be mid-stream"
    # nothing uncommitted was lost: it is all back in the queue. Some committed deliveries may
    # come back too: RabbitMQ 3.10 quorum queues drop some acks sent just before a channel
    # closes (rabbitmq-server#10327); the inbox absorbs them, as checked at the end.
    await wait_until(
        lambda: _depth_at_least(broker_url, consumers.queues.work, STREAM - handled),
        what=f"the {STREAM - handled} unhandled events back in the work queue",
        timeout=15,
    )
    unsettled = [line for line in worker.lines if "not settled" in line or "ack/nack" in line]
    assert unsettled == [], worker.output()

    await replacement.go()
    await replacement.wait_ready()
    await wait_until(
        lambda: _more_than(engine, STREAM - 1), what=f"{STREAM} handled events", timeout=120
    )
    await assert_each_handled_once(engine, consumers, events)


async def _more_than(engine: AsyncEngine, n: int) -> bool:
    return await count(engine, FaultThing) > n


# -- a relay process killed while its scheduled rows wait --------------------------------------


@ONLY_POSTGRES  # on SQLite the killed process's lease holds the next one off for up to 15 s
async def test_scheduled_rows_outlive_a_killed_relay_process_and_are_published_once_when_due(
    consumers: Consumers, engine: AsyncEngine, broker_url: str
) -> None:
    worker = await consumers.start("ok")
    replacement = await consumers.prepare("ok")
    await worker.wait_ready()
    async with Capture(broker_url, consumers.names, ["user.created.*"]) as capture:
        due = datetime.now(UTC) + timedelta(seconds=2)
        events = [user_created(new_user_id()) for _ in range(20)]
        async with UnitOfWork(session_factory(engine)(), f"/services/{SERVICE}") as uow:
            for event in events:
                uow.outbox.add(event.data, event_id=event.id, deliver_at=due)
            await uow.commit()

        await worker.kill()  # SIGKILL before they are due: no finally, nothing handed back
        assert datetime.now(UTC) < due, "killed too late to be before the rows were due"
        assert all(row.published_at is None for row in await outbox_rows(engine))
        await replacement.go()
        await replacement.wait_ready()
        await wait_until(
            lambda: _more_than(engine, len(events) - 1), what=f"{len(events)} handled events"
        )
        await assert_each_handled_once(engine, consumers, events)  # stops the replacement
        received = await capture.flush()

    assert sorted(m.message_id or "" for m in received) == sorted(e.id for e in events)
    not_before = due.replace(tzinfo=None)
    assert all(
        row.published_at is not None and row.published_at >= not_before
        for row in await outbox_rows(engine)
    )


async def _depth_at_least(url: str, queue: str, n: int) -> bool:
    return await queue_depth(url, queue) >= n


# -- the broker restarts while an outbox streams (on a private node: the shared one stays up) --


async def consumers_of(node: RabbitNode, queue: str) -> int | None:
    found = (await asyncio.to_thread(node.queues)).get(queue)
    return None if found is None else found["consumers"]


async def broker_answers(url: str) -> bool:
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception:
        return False
    await connection.close()
    return True


@ONLY_SQLITE
async def test_a_broker_restart_during_an_outbox_stream_loses_nothing_and_handles_nothing_twice(
    engine: AsyncEngine, rabbit_node: RabbitNode
) -> None:
    # aio-pika's reconnect interval (a URL option) down from 5 s
    broker_url = f"{rabbit_node.url}?reconnect_interval=1"
    total, chunk = 1_000, 50
    bus = Bus(
        SERVICE,
        engine,
        handlers={UserCreatedV2: on_user_created},
        settings=isolated_settings(broker_url),
    )
    qs = bus.names.service_queues(SERVICE, len(bus.settings.retry_tiers))
    outcomes = OutcomeRecorder()
    bus.listeners.append(outcomes)
    written: list[str] = []

    async def published_or_paused() -> bool:
        relay = bus.relay
        assert relay is not None
        return relay.stats.published >= len(written) or not relay.healthy

    async def write_stream() -> None:
        for _ in range(total // chunk):
            async with bus.unit_of_work() as uow:
                for _ in range(chunk):
                    payload = UserCreatedV2.model_validate(
                        sample("user.created.v2", user_id=new_user_id())
                    )
                    written.append(uow.outbox.add(payload).id)
                await uow.commit()
            # paced by outcomes: the next chunk once this one is published, or once the relay
            # has seen the outage (then the stream goes on into the outbox while it lasts)
            await eventually(published_or_paused, timeout=60, what="the chunk published")

    await bus.start()
    writer = asyncio.create_task(write_stream())
    try:
        await wait_until(lambda: _things_more_than(engine, 200), what="200 handled events")
        written_before_outage = len(written)
        try:
            await asyncio.to_thread(rabbit_node.stop_app)
            relay = bus.relay
            assert relay is not None

            async def outage_felt() -> bool:  # the relay failed, and events piled up meanwhile
                return not relay.healthy and len(written) > written_before_outage

            await wait_until(outage_felt, what="the relay to notice the outage", timeout=60)
        finally:
            await asyncio.to_thread(rabbit_node.start_app)
        assert written_before_outage < total, "the stream ended before the outage began"

        await wait_until(lambda: broker_answers(broker_url), what="the broker after start_app")
        await writer
        await wait_until(
            lambda: _consumed_by_one(rabbit_node, qs.work),
            what=f"one consumer on {qs.work} after recovery",
            timeout=60,
        )
        await wait_until(
            lambda: _things_more_than(engine, total - 1), what=f"{total} Things", timeout=120
        )
        assert await count(engine, Thing) == total
        assert await count(engine, InboxRow) == total
        assert outcomes.count("processed") == total
        assert outcomes.count("dead_lettered") == 0
        async with engine.connect() as conn:
            pending = select(func.count()).where(col(OutboxRow.published_at).is_(None))
            assert (await conn.execute(pending)).scalar_one() == 0
        assert await queue_depth(broker_url, qs.dlq) == 0
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await wait_until(lambda: broker_answers(broker_url), what="the broker", timeout=120)
        await bus.stop()
        await delete_prefixed(broker_url, bus.names, [qs.work, qs.dlq, *qs.retries])


async def _things_more_than(engine: AsyncEngine, n: int) -> bool:
    return await count(engine, Thing) > n


async def _consumed_by_one(node: RabbitNode, queue: str) -> bool:
    return await consumers_of(node, queue) == 1
