"""Onboarding backlog: the real onboarding service draining a backlog, against raw consume+ack.

    uv run --group bench python -m bench.onboarding_bench [--quick] [--write FILE]
        [-n N] [--rounds R] [--db sqlite,postgres]

Prints a Markdown section (figures, ratios, checks, stamp); ``--write FILE`` also puts it
between ``<!-- onboarding-bench:start -->`` and ``<!-- onboarding-bench:end -->`` in FILE.
Asserts nothing: a round whose checks fail is marked invalid in the output.

Contender: the onboarding service as it runs -- ``create_app`` with its lifespan (migrations,
engine, the real ``Bus`` with its handler and outbox relay), default messaging settings,
uvloop -- draining a pre-filled work queue of N (5,000) ``user.created.v2`` events for N
distinct users: consume, inbox, one workspace row, a ``workspace.created`` staged in the
outbox in the same transaction, commit, ack, and the relay's confirmed publish. A round ends
when N ``workspace.created`` events are in a quorum queue bound to ``workspace.created.#``
(each is published only after its transaction committed).

Baseline (same run, interleaved rounds, order rotating): raw aio-pika consume+ack of the same
N events from a queue with the same arguments, with the runtime's prefetch and ack policy
(whatever is waiting, up to ``batch_max``, settled by one multiple ack). The target compares
the service with this bare consumption: what the whole pipeline costs on top of reading the
queue. Both are timed from the moment consumption starts (the service's start-up done; the raw
consumer subscribed) to the last event done; CPU over the same window (this process, every
thread; the RabbitMQ server; on PostgreSQL every server process).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import func
from sqlmodel import select

from bench.common import (
    DB_LABEL,
    DbKind,
    Events,
    Sample,
    Window,
    database_kinds,
    rabbitmq_version,
    run_stamp,
)
from bench.notification_bench import (
    Probe,
    ServiceBench,
    duplicates,
    infrastructure,
    interleaved,
    queue_checks,
    run_service,
    set_up,
    versions,
)
from bench.report import Row, bench_parser, print_section, results_table
from tributary.messaging.db import create_engine, session_factory
from tributary.messaging.topology import Names, QueueSet
from tributary.onboarding.app import create_app
from tributary.onboarding.models import Workspace
from tributary.onboarding.settings import Settings
from tributary.testkit.waiting import eventually

SERVICE = "onboarding"
BINDING = "workspace.created.#"
MARKER = "onboarding-bench"
TARGET = 0.35
WARM_UP = 200


def say(text: str = "") -> None:
    print(text, flush=True)


class Bench(ServiceBench):
    service_name = SERVICE
    binding = BINDING
    prefix = "obench"

    async def service(self, kind: DbKind, events: Events) -> Sample:
        n = len(events.ids)
        settings = self.settings()
        names = Names(settings.name_prefix)
        queue_sets = [names.service_queues(SERVICE, len(settings.retry_tiers))]
        async with self.dbs.fresh_url(kind) as db_url:
            probe, work = await self.prepared(settings, events)
            try:
                app = create_app(
                    Settings.model_validate(
                        {"ONBOARDING_DATABASE_URL": db_url, "ONBOARDING_PORT": 0}
                    ),
                    settings,
                )
                sample = await run_service(app, probe, kind, n, self.timeout(n), queue_sets)
                sample.problems += await self.checks(db_url, probe, work, n)
                return sample
            finally:
                await self.clean(names, probe, queue_sets)

    async def checks(self, db_url: str, probe: Probe, work: QueueSet, n: int) -> list[str]:
        problems: list[str] = []
        engine = create_engine(db_url)
        try:
            async with session_factory(engine)() as session:
                made = (await session.exec(select(func.count()).select_from(Workspace))).one()
            if made != n:
                problems.append(f"{made} workspaces for {n} events")
        finally:
            await engine.dispose()
        problems += await queue_checks(probe, [work.work, work.dlq, *work.retries], n, "events")
        messages, _ = await probe.drain(n)
        if dup := duplicates(messages):
            problems.append(f"{dup} duplicate workspace.created message ids")
        return problems

    async def raw(self, events: Events) -> Sample:
        n = len(events.ids)
        settings = self.settings()
        names = Names(settings.name_prefix)
        probe, work = await self.prepared(settings, events)
        try:
            connection = await aio_pika.connect(self.url)
            try:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=settings.prefetch)
                queue = await channel.get_queue(work.work, ensure=False)
                loop = RawConsume(settings.batch_max)
                worker = asyncio.create_task(loop.work())
                try:
                    tag = await queue.consume(loop.arrived)
                    window = Window(database=False)

                    async def done() -> bool:
                        return loop.acked >= n

                    await eventually(done, timeout=self.timeout(n), what="raw", poll=0.01)
                    sample = window.close(n)
                    await queue.cancel(tag)
                finally:
                    worker.cancel()
            finally:
                await connection.close()
            sample.problems += await queue_checks(probe, [work.work], 0)  # nothing published
            return sample
        finally:
            await self.clean(names, probe, [work])


class RawConsume:
    """The runtime's consume and ack policy without the runtime: one worker takes what is
    waiting (up to ``batch``) and settles it with one multiple ack."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.waiting: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.acked = 0

    async def arrived(self, message: AbstractIncomingMessage) -> None:
        self.waiting.put_nowait(message)

    async def work(self) -> None:
        while True:
            batch = [await self.waiting.get()]
            while len(batch) < self.batch and not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
            await batch[-1].ack(multiple=len(batch) > 1)
            self.acked += len(batch)


def ms(seconds: float, count: int) -> str:
    return f"{seconds / count * 1000:.3f} ms" if count else "—"


async def main(args: argparse.Namespace) -> str:
    n = 1_000 if args.quick else args.n
    rounds = 2 if args.quick and args.rounds is None else (args.rounds or 3)
    kinds = database_kinds(args.db)
    command = " ".join(["python", "-m", "bench.onboarding_bench", *sys.argv[1:]])
    stamp = run_stamp()
    started = time.perf_counter()
    rows: list[Row] = []
    round_lines: list[str] = []
    invalid = False
    async with infrastructure(kinds) as (url, dbs, pg_version):
        stack = versions(await rabbitmq_version(url), pg_version)
        say(command)
        say(stamp)
        bench = Bench(url, dbs)
        events = Events.make(n)
        warm = Events.make(min(WARM_UP, n))
        for problem in (await bench.service(kinds[0], warm)).problems:
            say(f"  !! warm-up (service): {problem}")
        for kind in kinds:
            say(f"[{DB_LABEL[kind]}]")

            async def service(kind: DbKind = kind) -> Sample:
                return await bench.service(kind, events)

            async def raw() -> Sample:
                return await bench.raw(events)

            f = await interleaved(kind, {"service": service, "raw": raw}, rounds)
            ratios = [s.rate / r.rate for _, s, r in f.rounds]
            median = statistics.median(ratios)
            s, r = f.service, f.raw
            invalid |= not (s.valid and r.valid)
            db = DB_LABEL[kind]
            rows.append(
                Row(
                    f"onboarding draining {n:,} `user.created` ({db}): consume, inbox, workspace, "
                    "outbox, commit, ack, relay publish confirmed",
                    f"{s.rate:,.0f} events/s",
                    f"bench {ms(s.cpu, s.count)}, RabbitMQ {ms(s.broker, s.count)}"
                    + (f", PostgreSQL {ms(s.database, s.count)}" if kind == "postgres" else ""),
                    f"raw aio-pika consume+ack, the runtime's prefetch and multiple ack: "
                    f"{r.rate:,.0f} msg/s",
                    f"bench {ms(r.cpu, r.count)}, RabbitMQ {ms(r.broker, r.count)}",
                    f"{median:.0%} (median of the rounds' ratios; {min(ratios):.0%}-"
                    f"{max(ratios):.0%})",
                    f"≥ {TARGET:.0%}",
                    median >= TARGET,
                )
            )
            for i, (order, s1, r1) in enumerate(f.rounds, 1):
                problems = [f"service: {p}" for p in s1.problems] + [
                    f"raw: {p}" for p in r1.problems
                ]
                round_lines.append(
                    f"| {db} | {i} | {order} | {s1.rate:,.0f} | {ms(s1.cpu, s1.count)} | "
                    f"{r1.rate:,.0f} | {ms(r1.cpu, r1.count)} | {s1.rate / r1.rate:.0%} | "
                    f"{'; '.join(problems) if problems else 'ok'} |"
                )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "## Onboarding draining a backlog",
        "",
        "Printed by `bench/onboarding_bench.py` (its docstring says how it measures); "
        "nothing here is typed by hand.",
        "",
        f"- command: `{command}`",
        f"- run: {stamp} before, load average {load} after; {time.perf_counter() - started:.0f} s",
        f"- versions: {stack}",
        f"- settings: {set_up()}",
        f"- workload: {rounds} interleaved round(s) per database (order rotating), each {n:,} "
        f"`user.created.v2` events ({events.size:,} B) for distinct users, from a pre-filled "
        "quorum work queue; a warm-up round first",
    ]
    if args.quick:
        lines.append("- **`--quick`: a smoke run, not figures to keep**")
    if invalid:
        lines.append("- **a round's checks failed: its figures are not valid**")
    head = (
        "| database | round | order | service /s | CPU/event | raw /s | CPU/msg | ratio | checks |"
    )
    lines += [
        "",
        results_table(rows, unit="event"),
        "",
        "Rounds:",
        "",
        head,
        "|" + "---|" * 9,
        *round_lines,
    ]
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="N=1,000, 2 rounds: a smoke run")
    parser.add_argument("-n", type=int, default=5_000, help="events per round (5,000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per database (3)")
    parser.add_argument("--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    args = parser.parse_args(argv)
    print_section(uvloop.run(main(args)), args.write, MARKER)


if __name__ == "__main__":
    cli()
