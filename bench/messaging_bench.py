"""Messaging runtime benchmark: every figure next to its raw baseline, measured in one run.

    uv run --group bench python -m bench.messaging_bench [--quick] [--only 1,2,...] [--profile]
        [-n N] [--n-single N] [--write FILE]

Prints figures and ratios; asserts nothing. The machine is shared and noisy, so contenders that
are compared run interleaved, in rounds (rotating order) on fresh queues and databases; each
rate is the sum of their messages over the sum of their times, and a ratio against a target is
the median of the rounds' ratios (each pair ran back to back). Read the ratios.

Figures (1 KB persistent structured-mode ``user.created.v2``; N = 20,000, 2,000 with --quick):
  1  raw aio-pika consume + ack (prefetch 100) from a pre-filled quorum queue: the limit
  2  the runtime (Bus, a handler writing one row; inbox + row + ack) on SQLite and PostgreSQL:
     batching on (N messages) vs (1); batch_max=1 vs a hand-written per-message aio-pika loop
     (--n-single messages each, default 3,600: these run at a few hundred msg/s)
  3  FastStream doing the runtime's work per message (envelope parse, contract check and model,
     the inbox hash of the checked data, the same transaction; per-message ack, a task per
     delivery), vs the runtime with batch_max=1 and, separately, vs the runtime with batching
  4  the outbox relay draining N pre-inserted rows vs raw pipelined confirmed publishing
  5  commit -> published latency at 200 events/s through ``bus.unit_of_work()``
  6  consumer RSS after 10,000 and 50,000 messages (a child process, SQLite)

Every rate has beside it the CPU per message of each process involved, over the rate's own
window: this process (every thread: the contender runs in it), the RabbitMQ server and, on
PostgreSQL, every PostgreSQL server process; the baseline's too. It runs on uvloop, as the
services do. The section is printed at the end; ``--write FILE`` puts it between its markers
(messaging-bench) in FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import importlib
import json
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aio_pika
import uvloop
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from bench.common import (
    ROUTING_KEY,
    BenchThing,
    Clock,
    Databases,
    DbKind,
    Events,
    Sample,
    count_rows,
    databases,
    delete_queues,
    percentile,
    postgres_version,
    prefill,
    publish_pipelined,
    rabbitmq_version,
    rss_kib,
    user_created_payload,
)
from bench.report import (
    Meter,
    MeteredClock,
    Row,
    Section,
    bench_parser,
    cpu_cell,
    print_section,
    results_table,
    sqlite_version,
    versions,
)
from tributary.contracts.catalog import catalog
from tributary.contracts.envelope import CloudEvent, parse_event
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.consumer import admit, payload_hash
from tributary.messaging.db import InboxRow, OutboxRow, create_engine, session_factory, utcnow
from tributary.messaging.publisher import Publisher
from tributary.messaging.relay import OutboxRelay
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import queue_depth
from tributary.messaging.topology import QUORUM, Names, QueueSet, work_queue_arguments
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.infra import find_postgres, find_rabbitmq
from tributary.testkit.waiting import eventually

SERVICE = "onboarding"
DBS: tuple[DbKind, ...] = ("sqlite", "postgres")
LABEL = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
Figure = Callable[[int], Awaitable[Sample]]
MARKER = "messaging-bench"


def say(text: str) -> None:
    print(text, flush=True)


async def consume_with_runtime(
    engine: AsyncEngine, top: Topology, clock: Clock, timeout: float, what: str
) -> None:
    """The runtime (a :class:`Bus` with :func:`on_user_created`, on ``engine``) consumes
    ``top``'s prefilled work queue until ``clock`` has counted every message."""
    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=top.settings)
    bus.listeners.append(clock)
    await bus.start()
    try:
        await clock.wait(timeout, what)
    finally:
        await bus.stop()


def rate(x: float) -> str:
    return f"{x:,.0f} msg/s"


def cpu(s: Sample, kind: DbKind | None = None) -> str:
    """CPU per message of this process, RabbitMQ and (on PostgreSQL) the database server."""
    return cpu_cell(s, database=kind == "postgres")


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


async def on_user_created(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
    uow.session.add(BenchThing(event_id=event.id, user_id=event.data.user_id))


def inbox_row(key: str, event_id: str, event_type: str, body: bytes) -> InboxRow:
    return InboxRow(
        key=key,
        payload_hash=hashlib.sha256(body).hexdigest(),
        event_id=event_id,
        event_type=event_type,
        processed_at=utcnow(),
    )


def hashed_inbox_row(key: str, event_id: str, event_type: str, data: Any) -> InboxRow:
    """The inbox row as the runtime writes it: the hash of the checked data, canonical JSON."""
    return InboxRow(
        key=key,
        payload_hash=payload_hash(data),
        event_id=event_id,
        event_type=event_type,
        processed_at=utcnow(),
    )


async def handle_by_hand(sessions: async_sessionmaker[AsyncSession], body: bytes) -> None:
    """The bare per-message transaction: inbox look-up, inbox row + domain row, commit."""
    raw = json.loads(body)
    key = raw.get("idempotencykey") or f"{raw['type']}:{raw['id']}"
    async with sessions() as session:
        seen = await session.exec(select(InboxRow.payload_hash).where(col(InboxRow.key) == key))
        if seen.first() is None:
            session.add(inbox_row(key, raw["id"], raw["type"], body))
            session.add(BenchThing(event_id=raw["id"], user_id=raw["data"]["user_id"]))
            await session.commit()


@dataclass
class Topology:
    """A fresh name prefix and the runtime's queue names under it."""

    settings: MessagingSettings
    names: Names = field(init=False)
    queues: QueueSet = field(init=False)

    def __post_init__(self) -> None:
        self.names = Names(self.settings.name_prefix)
        self.queues = self.names.service_queues(SERVICE, len(self.settings.retry_tiers))

    @classmethod
    def fresh(cls, url: str, **overrides: Any) -> Topology:
        prefix = f"bench{uuid.uuid4().hex[:8]}."
        return cls(MessagingSettings(rabbitmq_url=url, name_prefix=prefix, **overrides))

    @property
    def work_arguments(self) -> dict[str, Any]:
        """The runtime's work-queue arguments: every consumer figure reads such a queue."""
        return work_queue_arguments(self.queues, self.names, self.settings.delivery_limit)

    async def bind_target(self, channel: AbstractChannel) -> str:
        """The events exchange and a quorum queue bound to ``user.created.*``."""
        exchange = await channel.declare_exchange(
            self.names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(self.queues.work, durable=True, arguments=dict(QUORUM))
        await queue.bind(exchange, routing_key="user.created.*")
        return self.queues.work

    async def delete(self) -> None:
        qs = self.queues
        await delete_queues(
            self.settings.rabbitmq_url,
            [qs.work, qs.dlq, *qs.retries],
            [self.names.exchange, self.names.dlx],
        )


@dataclass
class Latency:
    p50: float
    p99: float
    achieved: float
    op_p50: float
    """The unit-of-work commit (runtime) or the publish confirm (raw), ms."""
    op_p99: float


class Bench:
    def __init__(self, url: str, dbs: Databases, *, quick: bool) -> None:
        self.url = url
        self.dbs = dbs
        self.quick = quick
        self.rows: list[Row] = []
        self.restarts = 0
        self.spans: dict[str, tuple[int, int]] = {}
        self.per_round: dict[str, list[Sample]] = {}
        """Each contender's samples, round by round, of the last :meth:`rounds`."""
        """Each comparison's rounds and messages per round and contender."""

    @staticmethod
    def timeout(n: int) -> float:
        return max(120.0, n / 40)

    # -- 1: the consume limit ------------------------------------------------------------

    async def raw_consume(self, n: int) -> Sample:
        top = Topology.fresh(self.url)
        try:
            await prefill(self.url, top.queues.work, top.work_arguments, Events.make(n))
            clock = MeteredClock(n)
            connection = await aio_pika.connect(self.url)
            try:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=100)
                queue = await channel.get_queue(top.queues.work, ensure=False)

                async def on_message(message: AbstractIncomingMessage) -> None:
                    await message.ack()
                    clock.tick()

                tag = await queue.consume(on_message)
                await clock.wait(self.timeout(n), "raw consume")
                await queue.cancel(tag)
            finally:
                await connection.close()
            return clock.sample
        finally:
            await top.delete()

    # -- 2: the runtime and the hand-written loop -------------------------------------------
    # Consumer figures take the engine of a database that lives for the whole comparison
    # (one per contender, created empty); each round adds n rows to it.

    async def runtime(self, engine: AsyncEngine, n: int, batch_max: int) -> Sample:
        top = Topology.fresh(self.url, batch_max=batch_max)
        try:
            await prefill(self.url, top.queues.work, top.work_arguments, Events.make(n))
            async with self.checked(engine, n, f"runtime batch_max={batch_max}") as clock:
                what = f"runtime batch_max={batch_max}"
                await consume_with_runtime(engine, top, clock, self.timeout(n), what)
            return clock.sample
        finally:
            await top.delete()

    async def hand_loop(self, engine: AsyncEngine, n: int) -> Sample:
        top = Topology.fresh(self.url)
        try:
            await prefill(self.url, top.queues.work, top.work_arguments, Events.make(n))
            sessions = session_factory(engine)
            async with self.checked(engine, n, "hand-written loop") as clock:
                connection = await aio_pika.connect(self.url)
                try:
                    channel = await connection.channel()
                    await channel.set_qos(prefetch_count=top.settings.prefetch)
                    queue = await channel.get_queue(top.queues.work, ensure=False)

                    async def loop() -> None:
                        async with queue.iterator() as messages:
                            async for message in messages:
                                await handle_by_hand(sessions, message.body)
                                await message.ack()
                                clock.tick()
                                if clock.done.is_set():
                                    return

                    await asyncio.wait_for(loop(), self.timeout(n))
                finally:
                    await connection.close()
            return clock.sample
        finally:
            await top.delete()

    @asynccontextmanager
    async def checked(self, engine: AsyncEngine, n: int, what: str) -> AsyncIterator[MeteredClock]:
        """A clock for ``n`` messages; says so loudly if they did not each make their rows."""

        async def counts() -> tuple[int, int]:
            rows = await count_rows(engine, "SELECT count(*) FROM bench_things")
            return rows, await count_rows(engine, "SELECT count(*) FROM tributary_inbox")

        before = await counts()
        clock = MeteredClock(n, database=is_postgres(engine))
        yield clock
        rows, inbox = (a - b for a, b in zip(await counts(), before, strict=True))
        if rows != n or inbox != n or clock.unexpected:
            say(
                f"  !! {what}: {rows} rows, {inbox} inbox rows for {n} messages; "
                f"unexpected outcomes: {clock.unexpected[:5]}"
            )

    # -- 3: FastStream -----------------------------------------------------------------------

    async def faststream(self, engine: AsyncEngine, n: int) -> Sample:
        from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

        top = Topology.fresh(self.url)
        try:
            await prefill(self.url, top.queues.work, top.work_arguments, Events.make(n))
            sessions = session_factory(engine)
            async with self.checked(engine, n, "FastStream") as clock:
                # logger=None: without it FastStream logs two lines per message; its best case
                broker = RabbitBroker(
                    self.url,
                    logger=None,
                    default_channel=Channel(prefetch_count=top.settings.prefetch),
                )
                queue = RabbitQueue(  # type: ignore[call-overload]
                    top.queues.work,
                    queue_type=QueueType.QUORUM,
                    arguments=top.work_arguments,  # the runtime's: a DLX and a delivery limit
                )

                async def handle(body: bytes) -> None:
                    # the runtime's work per message: envelope parse, the contract check and
                    # the handler's model (admit), the inbox hash of the checked data, then
                    # the same transaction (inbox look-up, inbox row + domain row, commit)
                    event = parse_event(body)
                    payload, data = admit(
                        catalog().by_ce_type(event.type), UserCreatedV2, event.data
                    )
                    key = event.inbox_key
                    async with sessions() as session:
                        seen = await session.exec(
                            select(InboxRow.payload_hash).where(col(InboxRow.key) == key)
                        )
                        if seen.first() is None:
                            session.add(hashed_inbox_row(key, event.id, event.type, data))
                            session.add(BenchThing(event_id=event.id, user_id=payload.user_id))
                            await session.commit()
                    clock.tick()

                broker.subscriber(queue)(handle)
                await broker.start()
                try:
                    await clock.wait(self.timeout(n), "FastStream")
                finally:
                    await broker.stop()
            return clock.sample
        finally:
            await top.delete()

    # -- 4: publishing ---------------------------------------------------------------------

    async def raw_publish(self, n: int) -> Sample:
        top = Topology.fresh(self.url)
        events = Events.make(n)
        try:
            connection = await aio_pika.connect(self.url)
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                target = await top.bind_target(channel)
                exchange = await channel.get_exchange(top.names.exchange, ensure=False)
                meter = Meter()
                meter.start()
                seconds = await publish_pipelined(exchange, ROUTING_KEY, events, in_flight=256)
                sample = meter.stop(n, seconds)
            finally:
                await connection.close()
            if (depth := await queue_depth(self.url, target)) != n:
                say(f"  !! raw publish: {depth} of {n} in the queue")
            return sample
        finally:
            await top.delete()

    async def relay_drain(self, kind: DbKind, n: int) -> Sample:
        top = Topology.fresh(self.url)
        events = Events.make(n)
        try:
            async with self.dbs.fresh(kind) as engine:
                await insert_outbox_rows(engine, events)
                connection = await aio_pika.connect_robust(self.url)
                try:
                    target = await top.bind_target(await connection.channel())
                    publisher = Publisher(connection, in_flight=top.settings.publish_in_flight)
                    await publisher.open()
                    relay = OutboxRelay(
                        engine, publisher, service=SERVICE, names=top.names, settings=top.settings
                    )
                    meter = Meter(database=kind == "postgres")
                    meter.start()
                    start = time.perf_counter()
                    task = asyncio.create_task(relay.run())

                    async def drained() -> bool:
                        return relay.stats.published >= n or task.done()

                    await eventually(drained, timeout=self.timeout(n), what="relay", poll=0.005)
                    seconds = time.perf_counter() - start
                    sample = meter.stop(n, seconds)
                    relay.stop()
                    await task
                    await publisher.close()
                finally:
                    await connection.close()
                marked = await count_rows(
                    engine, "SELECT count(*) FROM tributary_outbox WHERE published_at IS NOT NULL"
                )
                depth = await queue_depth(self.url, target)
                if marked != n or depth != n:
                    say(f"  !! relay: {marked} rows marked, {depth} in the queue, of {n}")
            return sample
        finally:
            await top.delete()

    # -- 5: commit -> published latency ---------------------------------------------------

    async def latency(self, kind: DbKind | None, per_second: int, seconds: float) -> Latency:
        """One event every ``1/per_second`` s; a plain consumer notes each arrival.

        ``kind=None``: raw confirmed publishes instead of outbox commits, the floor.
        """
        top = Topology.fresh(self.url)
        total = round(per_second * seconds)
        arrived: dict[str, float] = {}
        sent: dict[str, float] = {}
        op_ms: list[float] = []
        produce: Callable[[int], Awaitable[None]]
        try:
            async with AsyncExitStack() as stack:
                connection = await aio_pika.connect(self.url)
                stack.push_async_callback(connection.close)
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=256)
                queue = await channel.get_queue(await top.bind_target(channel), ensure=False)

                async def on_message(message: AbstractIncomingMessage) -> None:
                    arrived[message.message_id or ""] = time.perf_counter()
                    await message.ack()

                await queue.consume(on_message)
                if kind is None:
                    publishing = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    exchange = await publishing.get_exchange(top.names.exchange, ensure=False)
                    events = Events.make(total)

                    async def publish(i: int) -> None:
                        sent[events.ids[i]] = began = time.perf_counter()
                        await exchange.publish(events.message(i), ROUTING_KEY, mandatory=True)
                        op_ms.append((time.perf_counter() - began) * 1000)

                    produce = publish
                else:
                    engine = await stack.enter_async_context(self.dbs.fresh(kind))
                    bus = Bus(SERVICE, engine, settings=top.settings)
                    await bus.start()
                    stack.push_async_callback(bus.stop)
                    payloads = [
                        user_created_payload(f"usr_{uuid.uuid4().hex}") for _ in range(total)
                    ]

                    async def commit(i: int) -> None:
                        began = time.perf_counter()
                        async with bus.unit_of_work() as uow:
                            event = uow.outbox.add(payloads[i])
                            await uow.commit()
                        sent[event.id] = done = time.perf_counter()
                        op_ms.append((done - began) * 1000)

                    produce = commit
                step = 1 / per_second
                start = time.perf_counter()
                for i in range(total):
                    # one writer on a fixed schedule; when it falls behind it goes on at once
                    if (delay := start + i * step - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)  # the pacing itself, not a wait for a state
                    await produce(i)
                achieved = total / (time.perf_counter() - start)

                async def all_arrived() -> bool:
                    return len(arrived) >= total

                await eventually(all_arrived, timeout=60, what="latency arrivals", poll=0.01)
            lat = [(arrived[k] - t) * 1000 for k, t in sent.items()]
            return Latency(
                percentile(lat, 50),
                percentile(lat, 99),
                achieved,
                percentile(op_ms, 50),
                percentile(op_ms, 99),
            )
        finally:
            await top.delete()

    # -- 6: RSS ------------------------------------------------------------------------------

    async def rss(self, marks: tuple[int, int]) -> dict[str, int]:
        top = Topology.fresh(self.url)
        try:
            await prefill(self.url, top.queues.work, top.work_arguments, Events.make(marks[1]))
            async with self.dbs.fresh("sqlite") as engine:
                spec = {
                    "db": engine.url.render_as_string(hide_password=False),
                    "prefix": top.settings.name_prefix,
                    "url": self.url,
                    "marks": list(marks),
                    "timeout": self.timeout(marks[1]),
                }
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.messaging_bench",
                    "--rss-child",
                    json.dumps(spec),
                    stdout=asyncio.subprocess.PIPE,
                )
                out, _ = await child.communicate()
                if child.returncode != 0:
                    raise RuntimeError(f"the RSS child exited {child.returncode}")
                result: dict[str, int] = json.loads(out.decode().strip().splitlines()[-1])
            return result
        finally:
            await top.delete()

    # -- the run -------------------------------------------------------------------------------

    @asynccontextmanager
    async def watched(self, what: str) -> AsyncIterator[None]:
        """Marks the rows added inside when the broker restarted meanwhile (others' tests)."""
        watch = await aio_pika.connect(self.url)
        first = len(self.rows)
        try:
            yield
        finally:
            if watch.is_closed or not watch.connected.is_set():  # closed by the server
                self.restarts += 1
                say(f"  !! the broker restarted during {what}: those figures are not valid")
                for row in self.rows[first:]:
                    row.figure += " (broker restarted: re-run)"
            else:
                await watch.close()

    async def rounds(
        self, what: str, contenders: dict[str, Figure], n: int, count: int
    ) -> dict[str, Sample]:
        """Run each contender ``count`` times on ``n // count`` messages, order rotating; each
        contender's messages, times and CPU summed over its rounds."""
        each = n // count
        total: dict[str, Sample] = {}
        names = list(contenders)
        self.per_round = {name: [] for name in names}
        started = time.perf_counter()
        for r in range(count):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                got = await contenders[name](each)
                self.per_round[name].append(got)
                total[name] = total[name] + got if name in total else got
        shown = ", ".join(
            f"{name} {rate(s.rate)} ({s.us(s.cpu):,.0f} µs CPU/msg here)"
            for name, s in total.items()
        )
        elapsed = time.perf_counter() - started
        say(f"  {what} ({count} rounds of {each:,}): {shown}   [{elapsed:.0f} s]")
        self.spans[what] = (count, each)
        return total

    def median_ratio(self, name: str, baseline: str) -> float:
        """The median over the last :meth:`rounds` of ``name``'s rate over ``baseline``'s in
        the same round (interleaved: each pair of rounds ran back to back)."""
        pairs = zip(self.per_round[name], self.per_round[baseline], strict=True)
        return statistics.median(a.rate / b.rate for a, b in pairs)

    async def run(self, only: set[int], n: int, n_single: int) -> None:
        for section in (self.consumers, self.publishing, self.latencies, self.memory):
            async with self.watched(section.__name__):
                await section(only, n, n_single)

    async def consumers(self, only: set[int], n: int, n_single: int) -> None:
        batched: dict[DbKind, Sample] = {}
        for kind in DBS if only & {1, 2, 3} else ():
            db = LABEL[kind]
            say(f"[consumers on {db}]")
            async with self.dbs.fresh(kind) as engine:
                got = await self.rounds(
                    "1 raw consume vs 2 runtime batching",
                    {
                        "raw": self.raw_consume,
                        "runtime": partial(self.runtime, engine, batch_max=100),
                    },
                    n,
                    4,
                )
            raw, batched[kind] = got["raw"], got["runtime"]
            ratio = self.median_ratio("runtime", "raw")
            self.rows += [
                Row(f"1 raw aio-pika consume+ack, prefetch 100 ({db} block)", rate(raw.rate),
                    cpu(raw), target="the limit"),
                Row(f"2 runtime, batch_max=100, {db}", rate(batched[kind].rate),
                    cpu(batched[kind], kind), f"raw consume+ack (1), same queue kind: "
                    f"{rate(raw.rate)}", cpu(raw), f"{ratio:.0%} (median of the rounds' ratios)",
                    "≥ 50 % (stretch 60 %)", ratio >= 0.5),
            ]  # fmt: skip
            if not only & {2, 3}:
                continue
            contenders: dict[str, Figure] = {}
            async with (
                self.dbs.fresh(kind) as hand_db,
                self.dbs.fresh(kind) as runtime_db,
                self.dbs.fresh(kind) as faststream_db,
            ):
                if 2 in only:
                    contenders["hand"] = partial(self.hand_loop, hand_db)
                    contenders["runtime"] = partial(self.runtime, runtime_db, batch_max=1)
                if 3 in only:
                    contenders["FastStream"] = partial(self.faststream, faststream_db)
                got = await self.rounds(
                    " vs ".join(
                        {
                            "hand": "2 hand loop",
                            "runtime": "runtime batch_max=1",
                            "FastStream": "3 FastStream",
                        }[name]
                        for name in contenders
                    ),
                    contenders,
                    n_single,
                    6 if n_single >= 3_000 else 2,
                )
            if 2 in only:
                single = got["runtime"].rate / got["hand"].rate
                self.rows.append(
                    Row(f"2 runtime, batch_max=1, {db}", rate(got["runtime"].rate),
                        cpu(got["runtime"], kind), f"hand-written aio-pika loop, the same "
                        f"transaction per message: {rate(got['hand'].rate)}",
                        cpu(got["hand"], kind), f"{single:.0%}", "≥ 85 %", single >= 0.85)
                )  # fmt: skip
            if 3 in only:
                fast = got["FastStream"]
                versus = batched[kind].rate / fast.rate
                same = "the runtime's work per message (parse, contract check, model, inbox "
                same += "hash, the same transaction)"
                self.rows.append(
                    Row(f"3 runtime (batching), {db}", rate(batched[kind].rate),
                        cpu(batched[kind], kind), f"FastStream doing {same}: {rate(fast.rate)}",
                        cpu(fast, kind), f"{versus:.1f}x", "≥ 2x", versus >= 2)
                )  # fmt: skip
            if {2, 3} <= only:
                fast = got["FastStream"]
                one = self.median_ratio("runtime", "FastStream")
                self.rows.append(
                    Row(f"3 runtime, batch_max=1, {db}", rate(got["runtime"].rate),
                        cpu(got["runtime"], kind), f"FastStream doing {same}, a task per "
                        f"delivery up to the prefetch: {rate(fast.rate)}",
                        cpu(fast, kind), f"{one:.0%} (median of the rounds' ratios)",
                        "≥ 100 %", one >= 1.0)
                )  # fmt: skip

    async def publishing(self, only: set[int], n: int, n_single: int) -> None:
        if 4 in only:
            say("[publishing]")
            for kind in DBS:
                db = LABEL[kind]
                got = await self.rounds(
                    f"4 raw publish vs relay ({db})",
                    {
                        "raw": self.raw_publish,
                        "relay": partial(self.relay_drain, kind),
                    },
                    n,
                    4,
                )
                relay, raw = got["relay"], got["raw"]
                ratio = self.median_ratio("relay", "raw")
                self.rows.append(
                    Row(f"4 outbox relay drain, {db}", rate(relay.rate), cpu(relay, kind),
                        f"raw pipelined confirmed publish, 256 in flight: {rate(raw.rate)}",
                        cpu(raw), f"{ratio:.0%} (median of the rounds' ratios)", "≥ 80 %",
                        ratio >= 0.8)
                )  # fmt: skip

    async def latencies(self, only: set[int], n: int, n_single: int) -> None:
        if 5 in only:
            seconds = 2.0 if self.quick else 10.0
            say(f"[commit -> published, 200 events/s for {seconds:.0f} s]")
            raw_lat = await self.latency(None, 200, seconds / 2)
            say(
                f"  5 raw publish -> arrival: p50 {raw_lat.p50:.1f} ms, p99 {raw_lat.p99:.1f} ms; "
                f"confirm p50 {raw_lat.op_p50:.1f} ms, p99 {raw_lat.op_p99:.1f} ms"
            )
            self.rows.append(
                Row("5 (baseline) raw publish→arrival p50 / p99, same queue kind",
                    f"{raw_lat.p50:.1f} / {raw_lat.p99:.1f} ms", "(a latency)")
            )  # fmt: skip
            for kind in DBS:
                db = LABEL[kind]
                lat = await self.latency(kind, 200, seconds)
                say(
                    f"  5 {db}: p50 {lat.p50:.1f} ms, p99 {lat.p99:.1f} ms at "
                    f"{lat.achieved:.0f} events/s; uow commit p50 {lat.op_p50:.1f} ms, "
                    f"p99 {lat.op_p99:.1f} ms"
                )
                self.rows += [
                    Row(f"5 commit→published p50, {db}",
                        f"{lat.p50:.1f} ms at {lat.achieved:.0f} events/s", "(a latency)",
                        f"raw publish→arrival: {raw_lat.p50:.1f} ms", "—",
                        f"{lat.p50 - raw_lat.p50:+.1f} ms", "≤ 5 ms", lat.p50 <= 5),
                    Row(f"5 commit→published p99, {db}",
                        f"{lat.p99:.1f} ms at {lat.achieved:.0f} events/s", "(a latency)",
                        f"raw publish→arrival: {raw_lat.p99:.1f} ms", "—",
                        f"{lat.p99 - raw_lat.p99:+.1f} ms", "≤ 20 ms", lat.p99 <= 20),
                    Row(f"5 (for reading) unit-of-work commit p50 / p99, {db}",
                        f"{lat.op_p50:.1f} / {lat.op_p99:.1f} ms", "(a latency)"),
                ]  # fmt: skip

    async def memory(self, only: set[int], n: int, n_single: int) -> None:
        if 6 in only:
            marks = (1_000, 5_000) if self.quick else (10_000, 50_000)
            say("[consumer RSS, child process, SQLite]")
            started = time.perf_counter()
            kib = await self.rss(marks)
            growth = (kib["second"] - kib["first"]) / kib["first"]
            say(
                f"  6 RSS at start {kib['start'] / 1024:.1f} MiB, after {marks[0]:,} "
                f"{kib['first'] / 1024:.1f} MiB, after {marks[1]:,} {kib['second'] / 1024:.1f} "
                f"MiB ({growth:+.1%})   [{time.perf_counter() - started:.0f} s]"
            )
            self.rows.append(
                Row(f"6 consumer RSS after {marks[1]:,} vs after {marks[0]:,} messages",
                    f"{kib['second'] / 1024:.1f} MiB", "(a size)",
                    f"the same process after {marks[0]:,}: {kib['first'] / 1024:.1f} MiB", "—",
                    f"{growth:+.1%}", "≤ +10 %", growth <= 0.10)
            )  # fmt: skip
            self.rows.append(
                Row("6 (for reading) consumer RSS at start", f"{kib['start'] / 1024:.1f} MiB",
                    "(a size)")
            )  # fmt: skip

    def table(self) -> str:
        return results_table(self.rows)


async def insert_outbox_rows(engine: AsyncEngine, events: Events) -> None:
    """One bulk insert of pending outbox rows, as committed units of work would leave them."""
    now = utcnow()
    async with engine.begin() as conn:
        await conn.execute(
            insert(OutboxRow),
            [
                {
                    "event_id": event_id,
                    "routing_key": ROUTING_KEY,
                    "body": body,
                    "trace_headers": "{}",
                    "correlation_id": event_id,
                    "created_at": now,
                    "published_at": None,
                    "attempts": 0,
                    "next_attempt_at": None,
                    "last_error": None,
                }
                for event_id, body in zip(events.ids, events.bodies, strict=True)
            ],
        )


# -- the RSS child -------------------------------------------------------------------------


async def rss_child(spec: dict[str, Any]) -> dict[str, int]:
    first, second = spec["marks"]
    seen: dict[str, int] = {"start": rss_kib()}
    engine = create_engine(spec["db"])
    settings = MessagingSettings(rabbitmq_url=spec["url"], name_prefix=spec["prefix"])
    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    clock = Clock(second)

    def mark(record: Any) -> None:
        clock(record)
        if clock.count == first:
            seen["first"] = rss_kib()
        elif clock.count == second:
            seen["second"] = rss_kib()

    bus.listeners.append(mark)
    await bus.start()
    try:
        await clock.wait(spec["timeout"], "RSS consumer")
    finally:
        await bus.stop()
        await engine.dispose()
    return seen


# -- main --------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> str:
    only = {int(x) for x in args.only.split(",")} if args.only else {1, 2, 3, 4, 5, 6}
    if 3 in only:  # fail now rather than minutes in (``uv sync`` without the group removes it)
        importlib.import_module("faststream.rabbit")
    n, n_single = (2_000, 1_000) if args.quick else (args.n, args.n_single)
    with ExitStack() as infra:
        url = find_rabbitmq(infra).url
        pg = find_postgres(infra).url
        async with AsyncExitStack() as stack:
            dbs = await stack.enter_async_context(databases(pg))
            async with dbs.fresh("postgres") as engine:
                pg_version = await postgres_version(engine)
            dists = ["uvloop", "aio-pika", "aiormq", "sqlalchemy", "sqlmodel", "aiosqlite"]
            dists += ["asyncpg", "pydantic", "jsonschema", "opentelemetry-sdk"]
            section = Section(
                "## Messaging runtime",
                "bench.messaging_bench",
                versions(
                    [*dists, *(["faststream"] if 3 in only else [])],
                    {
                        "RabbitMQ": await rabbitmq_version(url),
                        "PostgreSQL": pg_version,
                        "SQLite": sqlite_version(),
                    },
                ),
                quick=args.quick or n < 2_000,
            )
            say(section.stamp)
            say(section.versions)
            size = Events.make(1).size
            bench = Bench(url, dbs, quick=args.quick)
            profile = cProfile.Profile() if args.profile else None
            if profile:
                profile.enable()
            try:
                await bench.run(only, n, n_single)
            finally:
                if profile:
                    profile.disable()
                    pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            rounds = "; ".join(f"{what}: {c} x {each:,}" for what, (c, each) in bench.spans.items())
            section.settings += [
                f"figures {', '.join(str(f) for f in sorted(only))}; N = {n:,} (per-message "
                f"figures {n_single:,}); {size:,} B persistent structured-mode `{ROUTING_KEY}`, "
                "quorum queues with the runtime's work-queue arguments, a fresh name prefix "
                "and fresh databases (SQLite WAL file, new PostgreSQL database) per figure",
                f"interleaved rounds (order rotating) per comparison: {rounds or 'none'}; a "
                "rate is a contender's messages over its summed times (first to last ack)",
                "CPU per message over the same windows: bench = this process, every thread "
                "(the contender and its driver run in it); RabbitMQ and PostgreSQL = the whole "
                "servers (other clients' work included); event loop: uvloop"
                + ("; **cProfile on: slower than without**" if profile else ""),
            ]
            if bench.restarts:
                section.problems.append(
                    "the broker restarted during the run: the marked figures are not valid"
                )
            section.add(results_table(bench.rows))
            return section.markdown()


def cli(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="N=2,000: a smoke run")
    parser.add_argument("-n", type=int, default=20_000, help="messages per consumer figure")
    parser.add_argument(
        "--n-single", type=int, default=3_600, help="messages per per-message consumer figure"
    )
    parser.add_argument("--only", default="", help="comma-separated figures, e.g. 1,2")
    parser.add_argument("--profile", action="store_true", help="cProfile the whole run")
    parser.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        print(json.dumps(uvloop.run(rss_child(json.loads(args.rss_child)))), flush=True)
        return
    print_section(uvloop.run(main(args)), args.write, MARKER)  # the services run on uvloop too


if __name__ == "__main__":
    cli()
