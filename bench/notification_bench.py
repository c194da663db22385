"""Notification fan-out benchmark: the notification service's consumer against the raw broker.

    uv run --group bench python -m bench.notification_bench [--quick] [--write FILE]
        [-n N] [--rounds R] [--db sqlite,postgres]

Prints a Markdown section (figures, ratios, checks, stamp); ``--write FILE`` also puts it
between ``<!-- notification-bench:start -->`` and ``<!-- notification-bench:end -->`` in FILE.
Asserts nothing: a round whose checks fail is marked invalid in the output.

Contender: the service as it runs -- ``create_app`` with its lifespan (migrations, engine, the
real ``Bus`` with the service's handlers, channels and outbox relay), default messaging
settings, uvloop -- draining a pre-filled work queue of N ``report.ready.v1`` events for N
distinct users whose addresses are pre-loaded into the service's own directory table.
Preferences default: each event makes an in-app notification and stages an ``email.send``
command in the outbox, which the relay publishes. A round ends when all N commands are in
a quorum queue bound to ``email.send.#`` (the email service's place): a command is staged in
the transaction of its notification and published only after that commits, so N commands
there means N notifications committed and N commands confirmed.

Baseline (same run, interleaved rounds, order rotating): raw aio-pika doing the same broker
traffic -- consume the same N pre-filled events from a queue with the same arguments, with the
runtime's prefetch and ack policy (whatever is waiting, up to ``batch_max``, settled by one
multiple ack), and publish N confirmed ``email.send`` messages of the real command's size and
headers (copied from one the service sent) on a second connection, mandatory, with the
relay's in-flight limit.

Both sides are timed alike: from the moment consumption starts (the service's start-up
done; the raw consumer subscribed) until the bound queue holds N messages (polled every
10 ms with a passive declare, by both). CPU is read over the same window: this process
(``time.process_time``: every thread, so aiosqlite's too), the RabbitMQ server and, for
PostgreSQL, every server process (``/proc``; the whole server, other clients included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import distinct, func
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from bench.common import (
    DB_LABEL,
    Clock,
    Databases,
    DbKind,
    Events,
    Sample,
    Window,
    database_kinds,
    databases,
    delete_queues,
    package_version,
    postgres_version,
    prefill,
    rabbitmq_version,
    run_stamp,
)
from bench.report import Row, bench_parser, print_section, results_table
from tributary.contracts.envelope import new_event
from tributary.contracts.events import ReportReadyV1
from tributary.messaging.db import OutboxRow, create_engine, session_factory
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import QUORUM, Names, QueueSet, declare_exchanges
from tributary.messaging.topology import work_queue_arguments as queue_arguments
from tributary.notification.app import create_app
from tributary.notification.models import Address, Delivery, Notification
from tributary.notification.settings import Settings
from tributary.service.migrations import upgrade
from tributary.testkit.infra import find_postgres, find_rabbitmq
from tributary.testkit.waiting import eventually

SERVICE = "notification"
EVENT_KEY = "report.ready.v1"
COMMAND_KEY = "email.send.v1"
COMMAND_BINDING = "email.send.#"
MIGRATIONS = Path(create_app.__code__.co_filename).parent / "migrations"
MARKER = "notification-bench"
LABEL = DB_LABEL
POLL_SECONDS = 0.01
WARM_UP = 200


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """N ``report.ready.v1`` events as the reports app publishes them, one per distinct user."""

    users: list[str]
    events: Events

    @classmethod
    def make(cls, n: int) -> Workload:
        users = [f"usr_{uuid.uuid4().hex}" for _ in range(n)]
        ids: list[str] = []
        bodies: list[bytes] = []
        for user in users:
            report = f"rpt_{uuid.uuid4().hex[:20]}"
            event = new_event(
                routing_key=EVENT_KEY,
                source="/apps/reports",
                data=ReportReadyV1(
                    report_id=report,
                    user_id=user,
                    report_name="Quarterly revenue by region and product line, 2026 Q3",
                    url=f"https://reports.example.com/reports/{report}",
                    ready_at=datetime.now(UTC),
                ),
                correlationid=str(uuid.uuid4()),
            )
            ids.append(event.id)
            bodies.append(event.to_bytes())
        return cls(users, Events(ids, bodies, routing_key=EVENT_KEY, app_id="reports-app"))

    @property
    def n(self) -> int:
        return len(self.users)

    def address(self, i: int) -> Address:
        """User ``i``'s entry in the service's directory, as its user.created handler makes it."""
        return Address(
            user_id=self.users[i], email=f"recipient.{i:06d}@mail.example.com", locale="en-GB"
        )


@dataclass(frozen=True)
class Command:
    """An ``email.send`` message the service published: the baseline sends copies of it."""

    body: bytes
    headers: dict[str, Any]
    app_id: str

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Command:
        headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-")}
        return cls(message.body, headers, message.app_id or SERVICE)

    def copies(self, n: int) -> Events:
        ids = [str(uuid.uuid4()) for _ in range(n)]
        return Events(
            ids, [self.body] * n, routing_key=COMMAND_KEY, app_id=self.app_id, headers=self.headers
        )


# -- measuring ---------------------------------------------------------------------------------


class Probe:
    """A quorum queue bound to ``binding`` (``email.send.#``: what the email service would
    receive)."""

    def __init__(self, url: str, names: Names, binding: str = COMMAND_BINDING) -> None:
        self.url = url
        self.names = names
        self.binding = binding
        self.queue = f"{names.prefix}probe.{binding.rstrip('.#')}"
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def declare(self) -> None:
        connection = await aio_pika.connect(self.url)
        try:
            await declare_exchanges(connection, self.names)
            channel = await connection.channel()
            queue = await channel.declare_queue(self.queue, durable=True, arguments=dict(QUORUM))
            await queue.bind(self.names.exchange, self.binding)
        finally:
            await connection.close()
        # a plain (not robust) connection: each passive declare asks the broker
        self._connection = await aio_pika.connect(self.url)
        self._channel = await self._connection.channel()

    async def depth(self, queue: str | None = None) -> int:
        assert self._channel is not None
        declared = await self._channel.declare_queue(queue or self.queue, passive=True)
        return int(declared.declaration_result.message_count or 0)

    async def until(self, n: int, also: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Until the queue holds ``n`` messages and ``also()``, polled every 10 ms."""

        async def done() -> bool:
            return await self.depth() >= n and also()  # one poll per tick, on both sides

        await eventually(done, timeout=timeout, what=what, poll=POLL_SECONDS)

    async def drain(self, expected: int) -> tuple[list[AbstractIncomingMessage], int]:
        """Every message in the queue (and how many there were), taken off it."""
        assert self._channel is not None
        there = await self.depth()
        got: list[AbstractIncomingMessage] = []
        if there:
            assert self._connection is not None
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await channel.get_queue(self.queue, ensure=False)
            full = asyncio.Event()

            async def take(message: AbstractIncomingMessage) -> None:
                got.append(message)
                if len(got) >= there:
                    full.set()

            tag = await queue.consume(take, no_ack=True)
            try:
                await asyncio.wait_for(full.wait(), max(60.0, expected / 500))
            finally:
                await queue.cancel(tag)
                await channel.close()
        return got, there

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


def duplicates(messages: Iterable[AbstractIncomingMessage]) -> int:
    ids = [m.message_id for m in messages]
    return len(ids) - len(set(ids))


# -- the two contenders ------------------------------------------------------------------------


class ServiceBench:
    """A service's app against the raw broker: fresh names, a pre-filled work queue, a probe
    queue bound to what the service publishes, and everything deleted afterwards."""

    service_name = SERVICE
    binding = COMMAND_BINDING
    prefix = "nbench"

    def __init__(self, url: str, dbs: Databases) -> None:
        self.url = url
        self.dbs = dbs

    def settings(self) -> MessagingSettings:
        """The runtime's settings as a service reads them, under a fresh name prefix."""
        return MessagingSettings(
            rabbitmq_url=self.url, name_prefix=f"{self.prefix}{uuid.uuid4().hex[:8]}."
        )

    @staticmethod
    def timeout(n: int) -> float:
        return max(120.0, n / 20)

    async def prepared(self, settings: MessagingSettings, events: Events) -> tuple[Probe, QueueSet]:
        """The events exchange with the probe bound, and the work queue pre-filled."""
        names = Names(settings.name_prefix)
        work = names.service_queues(self.service_name, len(settings.retry_tiers))
        probe = Probe(self.url, names, self.binding)
        await probe.declare()
        arguments = queue_arguments(work, names, settings.delivery_limit)
        await prefill(self.url, work.work, arguments, events)
        return probe, work

    async def clean(self, names: Names, probe: Probe, queue_sets: Iterable[QueueSet]) -> None:
        await probe.close()
        queues = [probe.queue]
        for qs in queue_sets:
            queues += [qs.work, qs.dlq, *qs.retries]
        await delete_queues(self.url, list(dict.fromkeys(queues)), [names.exchange, names.dlx])


class Bench(ServiceBench):
    def __init__(self, url: str, dbs: Databases) -> None:
        super().__init__(url, dbs)
        self.command: Command | None = None

    # -- the notification service ------------------------------------------------------------

    async def service(self, kind: DbKind, workload: Workload) -> Sample:
        n = workload.n
        settings = self.settings()
        names = Names(settings.name_prefix)
        queue_sets = [names.service_queues(SERVICE, len(settings.retry_tiers))]
        async with self.dbs.fresh_url(kind) as db_url:
            probe, work = await self.prepared(settings, workload.events)
            try:
                await self.directory(db_url, workload)
                app = create_app(
                    Settings.model_validate(
                        {
                            "NOTIFICATION_DATABASE_URL": db_url,
                            "NOTIFICATION_PORT": 0,
                            "NOTIFICATION_PUBLIC_URL": "https://notify.example.com",
                            "NOTIFICATION_UNSUBSCRIBE_KEY": "bench-unsubscribe-key-" + "k" * 32,
                        }
                    ),
                    settings,
                )
                sample = await run_service(app, probe, kind, n, self.timeout(n), queue_sets)
                # stopped: the checks read what is left
                sample.problems += await self.service_checks(db_url, probe, work, workload)
                return sample
            finally:
                await self.clean(names, probe, queue_sets)

    async def directory(self, db_url: str, workload: Workload) -> None:
        """The service's tables (its migrations), and one address per recipient."""
        await upgrade(MIGRATIONS, db_url)
        engine = create_engine(db_url)
        try:
            async with session_factory(engine)() as session:
                session.add_all(workload.address(i) for i in range(workload.n))
                await session.commit()
        finally:
            await engine.dispose()

    async def service_checks(
        self, db_url: str, probe: Probe, work: QueueSet, workload: Workload
    ) -> list[str]:
        n = workload.n
        problems: list[str] = []
        engine = create_engine(db_url)
        try:
            problems += await table_checks(engine, n)
        finally:
            await engine.dispose()
        problems += await queue_checks(probe, [work.work, work.dlq, *work.retries], n)
        messages, _ = await probe.drain(n)
        if dup := duplicates(messages):
            problems.append(f"{dup} duplicate email.send message ids")
        users = {json.loads(m.body)["data"].get("user_id") for m in messages}
        if users != set(workload.users):
            problems.append(f"email.send for {len(users & set(workload.users))} of {n} users")
        if messages and self.command is None:
            self.command = Command.of(messages[0])
        return problems

    # -- the raw broker ------------------------------------------------------------------

    async def raw(self, workload: Workload) -> Sample:
        if self.command is None:
            raise RuntimeError("the raw baseline copies a command the service sent: none yet")
        n = workload.n
        settings = self.settings()
        names = Names(settings.name_prefix)
        commands = self.command.copies(n)
        probe, work = await self.prepared(settings, workload.events)
        try:
            async with AsyncExitStack() as stack:
                consuming = await aio_pika.connect(self.url)
                stack.push_async_callback(consuming.close)
                publishing = await aio_pika.connect(self.url)
                stack.push_async_callback(publishing.close)
                channel = await consuming.channel()
                await channel.set_qos(prefetch_count=settings.prefetch)
                queue = await channel.get_queue(work.work, ensure=False)
                confirming = await publishing.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                exchange = await confirming.get_exchange(names.exchange, ensure=False)
                loop = RawLoop(commands, exchange, settings.batch_max, settings.publish_in_flight)
                worker = asyncio.create_task(loop.work())
                try:
                    tag = await queue.consume(loop.arrived)
                    window = Window(database=False)
                    await probe.until(
                        n,
                        lambda: loop.acked >= n and loop.confirmed >= n,
                        timeout=self.timeout(n),
                        what="raw baseline",
                    )
                    sample = window.close(n)
                    await queue.cancel(tag)
                finally:
                    worker.cancel()
                if loop.failures:
                    sample.problems.append(f"{loop.failures} publishes failed")
            sample.problems += await queue_checks(probe, [work.work], n)
            messages, _ = await probe.drain(n)
            if dup := duplicates(messages):
                sample.problems.append(f"{dup} duplicate message ids")
            return sample
        finally:
            await self.clean(names, probe, [work])


async def run_service(
    app: Any, probe: Probe, kind: DbKind, n: int, timeout: float, queue_sets: list[QueueSet]
) -> Sample:
    """Start ``app`` (its lifespan: migrations, the bus, the relay), time it from then until
    the probe holds ``n`` messages, and stop it. The CPU over that window; the service's
    queues are added to ``queue_sets`` (to delete), outcomes other than processed reported."""
    outcomes = Clock(n)  # only its list of outcomes other than processed is read
    async with app.router.lifespan_context(app):
        window = Window(database=kind == "postgres")
        bus = app.state.bus
        bus.listeners.append(outcomes)
        queue_sets += [c.queues for c in bus.consumers]
        await probe.until(n, lambda: True, timeout=timeout, what=f"service on {kind}")
        sample = window.close(n)
    if outcomes.unexpected:
        sample.problems.append(f"outcomes {sorted(set(outcomes.unexpected))[:3]}")
    return sample


class RawLoop:
    """The runtime's consume and ack policy without the runtime: one worker takes what is
    waiting (up to ``batch_max``) and settles it with one multiple ack; each message starts a
    confirmed, mandatory publish of one command, at most ``in_flight`` outstanding."""

    def __init__(
        self, commands: Events, exchange: aio_pika.abc.AbstractExchange, batch: int, in_flight: int
    ) -> None:
        self.commands = commands
        self.exchange = exchange
        self.batch = batch
        self.limit = asyncio.Semaphore(in_flight)
        self.waiting: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.taken = self.acked = self.confirmed = self.failures = 0
        self.publishing: set[asyncio.Task[None]] = set()

    async def arrived(self, message: AbstractIncomingMessage) -> None:
        self.waiting.put_nowait(message)

    async def publish(self, i: int) -> None:
        try:
            async with self.limit:
                await self.exchange.publish(self.commands.message(i), COMMAND_KEY, mandatory=True)
            self.confirmed += 1
        except Exception:
            self.failures += 1

    async def work(self) -> None:
        while True:
            batch = [await self.waiting.get()]
            while len(batch) < self.batch and not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
            for _ in batch:
                task = asyncio.create_task(self.publish(self.taken))
                self.publishing.add(task)
                task.add_done_callback(self.publishing.discard)
                self.taken += 1
            await batch[-1].ack(multiple=len(batch) > 1)
            self.acked += len(batch)


async def table_checks(engine: AsyncEngine, n: int) -> list[str]:
    """Every user has one in-app notification and one email delivery; every command staged
    was published."""
    user = col(Notification.user_id)
    outbox = col(OutboxRow.routing_key)
    found = {
        "notifications": select(func.count()).select_from(Notification),
        "users notified": select(func.count(distinct(user))),
        "email deliveries": select(func.count())
        .select_from(Delivery)
        .where(col(Delivery.channel) == "email"),
        "email.send staged": select(func.count()).where(outbox == COMMAND_KEY),
    }
    problems: list[str] = []
    async with engine.connect() as conn:
        for what, query in found.items():
            if (got := (await conn.execute(query)).scalar_one()) != n:
                problems.append(f"{got:,} {what} of {n:,}")
        unpublished = select(func.count()).where(col(OutboxRow.published_at).is_(None))
        if left := (await conn.execute(unpublished)).scalar_one():
            problems.append(f"{left} outbox rows unpublished")
    return problems


async def queue_checks(
    probe: Probe, queues: Iterable[str], n: int, what: str = "commands"
) -> list[str]:
    """The bound queue holds exactly N ``what`` (N = 0: not checked); nothing is left in
    ``queues`` (the work queue, and the service's retry queues and DLQ)."""
    problems: list[str] = []
    if n and (got := await probe.depth()) != n:
        problems.append(f"{got:,} {what} in the bound queue for {n:,}")
    for name in queues:
        if left := await probe.depth(name):
            problems.append(f"{left} messages left in {name.split('.', 1)[1]}")
    return problems


# -- rounds and the report ---------------------------------------------------------------------


@dataclass
class Figure:
    """Both contenders on one database: the sum of their rounds, and each round."""

    kind: DbKind
    service: Sample
    raw: Sample
    rounds: list[tuple[str, Sample, Sample]]
    """(order, service, raw) of each round."""

    @property
    def ratio(self) -> float:
        return self.service.rate / self.raw.rate


async def interleaved(
    kind: DbKind, contenders: dict[str, Callable[[], Awaitable[Sample]]], rounds: int
) -> Figure:
    names = list(contenders)
    totals: dict[str, Sample] = {}
    per_round: list[tuple[str, Sample, Sample]] = []
    started = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        got: dict[str, Sample] = {}
        for name in order:
            got[name] = await contenders[name]()
            totals[name] = totals[name] + got[name] if name in totals else got[name]
        service, raw = got["service"], got["raw"]
        per_round.append((" then ".join(order), service, raw))
        say(
            f"  {LABEL[kind]} round {r + 1} ({' then '.join(order)}): service "
            f"{service.rate:,.0f}/s {service.ms(service.cpu):.3f} ms CPU, raw {raw.rate:,.0f}/s "
            f"{raw.ms(raw.cpu):.3f} ms CPU, ratio {service.rate / raw.rate:.0%}"
        )
        for who, s in got.items():
            for problem in s.problems:
                say(f"  !! {who}: {problem}")
    say(f"  [{time.perf_counter() - started:.0f} s]")
    return Figure(kind, totals["service"], totals["raw"], per_round)


def ms(x: float) -> str:
    return f"{x:.3f} ms"


def figure_rows(f: Figure, n: int) -> list[Row]:
    db = LABEL[f.kind]
    s, r = f.service, f.raw
    flag = "" if s.valid and r.valid else " — **INVALID round(s)**"
    rows = [
        Row(
            f"notifications/s, {db} (in-app row + email.send confirmed; {s.rounds} x {n:,}){flag}",
            f"{s.rate:,.0f}/s",
            baseline=f"{r.rate:,.0f}/s (raw aio-pika)",
            ratio=f"{f.ratio:.0%}",
        ),
        Row(
            f"CPU per notification, this process ({db}: consumer, handlers, relay, driver)",
            ms(s.ms(s.cpu)),
            baseline=ms(r.ms(r.cpu)),
            ratio=f"{s.cpu / r.cpu:.1f}x" if r.cpu else "—",
        ),
        Row(
            f"CPU per notification, RabbitMQ server ({db} run)",
            ms(s.ms(s.broker)),
            baseline=ms(r.ms(r.broker)),
            ratio=f"{s.broker / r.broker:.1f}x" if r.broker else "—",
        ),
    ]
    if f.kind == "postgres":
        rows.append(
            Row(
                "CPU per notification, PostgreSQL server (every server process)",
                ms(s.ms(s.database)),
                baseline="—",
            )
        )
    ratios = [svc.rate / raw.rate for _, svc, raw in f.rounds]
    rows.append(
        Row(
            f"ratio per round, {db}: median (min-max)",
            f"{statistics.median(ratios):.0%} ({min(ratios):.0%}-{max(ratios):.0%})",
        )
    )
    return rows


def rounds_table(figures: list[Figure]) -> str:
    head = (
        "| database | round | order | service /s | CPU/notif. | raw /s | CPU/msg | ratio | checks |"
    )
    lines = [head, "|" + "---|" * 9]
    for f in figures:
        for i, (order, s, r) in enumerate(f.rounds, 1):
            problems = [f"service: {p}" for p in s.problems] + [f"raw: {p}" for p in r.problems]
            lines.append(
                f"| {LABEL[f.kind]} | {i} | {order} | {s.rate:,.0f} | {ms(s.ms(s.cpu))} | "
                f"{r.rate:,.0f} | {ms(r.ms(r.cpu))} | {s.rate / r.rate:.0%} | "
                f"{'; '.join(problems) if problems else 'ok'} |"
            )
    return "\n".join(lines)


@dataclass
class Report:
    command: str
    stamp: str
    load_after: str
    versions: str
    settings: str
    n: int
    rounds: int
    event_size: int
    command_size: int
    figures: list[Figure]
    seconds: float
    quick: bool

    def markdown(self) -> str:
        rows = [row for f in self.figures for row in figure_rows(f, self.n)]
        invalid = any(not (f.service.valid and f.raw.valid) for f in self.figures)
        lines = [
            "## Notification fan-out",
            "",
            "Printed by `bench/notification_bench.py` (its docstring says how it measures); "
            "nothing here is typed by hand.",
            "",
            f"- command: `{self.command}`",
            f"- run: {self.stamp} before, {self.load_after} after; {self.seconds:.0f} s",
            f"- versions: {self.versions}",
            f"- settings: {self.settings}",
            f"- workload: {self.rounds} interleaved round(s) per database (order rotating), "
            f"each {self.n:,} `{EVENT_KEY}` events ({self.event_size:,} B) for {self.n:,} "
            f"distinct users, addresses pre-loaded, default preferences; per event one in-app "
            f"notification and one `{COMMAND_KEY}` command ({self.command_size:,} B) confirmed "
            "into a bound quorum queue",
            "- contender: the notification service as it runs (`create_app` lifespan: "
            "migrations, the real `Bus`, handlers, channels and outbox relay; default "
            "messaging settings; uvloop), from a pre-filled work queue",
            "- baseline: raw aio-pika, the same queues and traffic: the same prefetch and "
            "multiple-ack per waiting batch, confirmed mandatory publishes of copies of the "
            "service's command, the relay's in-flight limit",
            "- time: consumption started → N commands in the bound queue (both polled alike); "
            "CPU over the same window: this process (every thread), the RabbitMQ server, the "
            "PostgreSQL server (whole servers: other clients' work included)",
        ]
        if self.quick:
            lines.append("- **`--quick`: a smoke run, not figures to keep**")
        if invalid:
            lines.append("- **a round's checks failed: its figures are not valid**")
        lines += ["", results_table(rows, cpu=False), "", "Rounds:", "", rounds_table(self.figures)]
        return "\n".join(lines)


def set_up() -> str:
    """The runtime settings the environment gives (both contenders use them), and tracing."""
    s = MessagingSettings()
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        tracing = "off"
    else:
        exporter = "OTLP" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none"
        sampler = os.environ.get("OTEL_TRACES_SAMPLER", "default")
        tracing = f"on (sampler {sampler}, exporter {exporter})"
    return (
        f"prefetch {s.prefetch}, batch_max {s.batch_max}, concurrency {s.concurrency}, "
        f"publish in flight {s.publish_in_flight}, outbox batch {s.outbox_batch}; "
        f"tracing {tracing}"
    )


def versions(rabbit: str, postgres: str | None) -> str:
    v = package_version
    pg = f", PostgreSQL {postgres}" if postgres else ""
    return (
        f"Python {platform.python_version()}, uvloop {v('uvloop')}, aio-pika {v('aio-pika')}, "
        f"aiormq {v('aiormq')}, SQLAlchemy {v('sqlalchemy')}, SQLModel {v('sqlmodel')}, "
        f"aiosqlite {v('aiosqlite')}, asyncpg {v('asyncpg')}, pydantic {v('pydantic')}, "
        f"FastAPI {v('fastapi')}; RabbitMQ {rabbit}{pg}, SQLite {sqlite3.sqlite_version}; "
        f"{os.cpu_count()} CPUs, {platform.platform()}"
    )


@asynccontextmanager
async def infrastructure(kinds: list[DbKind]) -> AsyncIterator[tuple[str, Databases, str | None]]:
    """The broker URL, a source of fresh databases and the PostgreSQL version (if used)."""
    with ExitStack() as infra:
        url = find_rabbitmq(infra).url
        pg = find_postgres(infra).url if "postgres" in kinds else ""
        async with databases(pg) as dbs:
            pg_version = None
            if pg:
                engine = create_engine(pg)
                try:
                    pg_version = await postgres_version(engine)
                finally:
                    await engine.dispose()
            yield url, dbs, pg_version


async def main(args: argparse.Namespace) -> Report:
    n = 1_000 if args.quick else args.n
    rounds = 2 if args.quick and args.rounds is None else (args.rounds or 3)
    kinds = database_kinds(args.db)
    command = " ".join(["python", "-m", "bench.notification_bench", *sys.argv[1:]])
    stamp = run_stamp()
    started = time.perf_counter()
    async with infrastructure(kinds) as (url, dbs, pg_version):
        stack_versions = versions(await rabbitmq_version(url), pg_version)
        say(command)
        say(stamp)
        say(stack_versions)
        say(set_up())
        bench = Bench(url, dbs)
        workload = Workload.make(n)
        warm = Workload.make(min(WARM_UP, n))
        say(f"N = {n:,} per round, {rounds} round(s) per database; warm-up {warm.n}")
        for problem in (await bench.service(kinds[0], warm)).problems:
            say(f"  !! warm-up (service): {problem}")
        for problem in (await bench.raw(warm)).problems:
            say(f"  !! warm-up (raw): {problem}")
        figures: list[Figure] = []
        for kind in kinds:
            say(f"[{LABEL[kind]}]")

            async def service(kind: DbKind = kind) -> Sample:
                return await bench.service(kind, workload)

            async def raw() -> Sample:
                return await bench.raw(workload)

            figures.append(await interleaved(kind, {"service": service, "raw": raw}, rounds))
        assert bench.command is not None
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        return Report(
            command=command,
            stamp=stamp,
            load_after=f"load average {load}",
            versions=stack_versions,
            settings=set_up(),
            n=n,
            rounds=rounds,
            event_size=workload.events.size,
            command_size=len(bench.command.body),
            figures=figures,
            seconds=time.perf_counter() - started,
            quick=args.quick,
        )


def cli(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="N=1,000, 2 rounds: a smoke run")
    parser.add_argument("-n", type=int, default=10_000, help="notifications per round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per database (3)")
    parser.add_argument("--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    args = parser.parse_args(argv)
    # each round's app instruments the engine and app again: OpenTelemetry says so each time
    logging.getLogger("opentelemetry.instrumentation.instrumentor").setLevel(logging.ERROR)
    report = uvloop.run(main(args))  # the services run on uvloop too
    print_section(report.markdown(), args.write, MARKER)


if __name__ == "__main__":
    cli()
