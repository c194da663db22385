"""SQLite ``synchronous=NORMAL`` vs ``FULL``: what durable acks cost a group-commit consumer.

    uv run python -m bench.sqlite_sync_bench [--quick] [-n N] [--n-single N]

Prints figures and ratios; asserts nothing. NORMAL and FULL run interleaved, in rounds with
the order rotating, each on a fresh database file, so a noisy neighbour hits both alike.

Figures (1 KB persistent ``user.created.v2``; each level gets the same message counts):
  1  bare database: raw aiosqlite, WAL, an inbox row and a domain row per message inserted
     with executemany, one commit per 100 messages (what group commit does at best)
  2  the runtime (Bus, batch_max=100, a handler adding one row) from a pre-filled quorum queue
  3  the runtime with batch_max=1: one commit, and with FULL one fsync, per message
Throughput runs from the first completion to the last; CPU is this process's CPU time
(every thread) over the same span, per message, and (runtime figures) the RabbitMQ server's.

    --write FILE   put the section between its markers (sqlite-sync-bench) in FILE
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from pathlib import Path

import aiosqlite
import uvloop
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.common import (
    Databases,
    Events,
    Sample,
    count_rows,
    databases,
    prefill,
    rabbitmq_version,
)
from bench.messaging_bench import Topology, consume_with_runtime
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
from tributary.messaging.db import SQLITE_SYNCHRONOUS_ENV, utcnow
from tributary.testkit.infra import find_rabbitmq

LEVELS = ("NORMAL", "FULL")
PRAGMA_VALUE = {"NORMAL": 1, "FULL": 2}
EVENT_TYPE = "com.tributary.user.created.v2"
MARKER = "sqlite-sync-bench"


def say(line: str) -> None:
    print(line, flush=True)


@contextmanager
def synchronous(level: str) -> Iterator[None]:
    """Engines created inside use ``PRAGMA synchronous=<level>`` (read at creation)."""
    before = os.environ.get(SQLITE_SYNCHRONOUS_ENV)
    os.environ[SQLITE_SYNCHRONOUS_ENV] = level
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SQLITE_SYNCHRONOUS_ENV, None)
        else:
            os.environ[SQLITE_SYNCHRONOUS_ENV] = before


class SyncBench:
    def __init__(self, url: str, dbs: Databases) -> None:
        self.url = url
        self.dbs = dbs
        self.problems: list[str] = []

    async def fresh(self, stack: AsyncExitStack, level: str) -> AsyncEngine:
        """A fresh SQLite database with the runtime's and the bench's tables, at ``level``."""
        with synchronous(level):
            engine = await stack.enter_async_context(self.dbs.fresh("sqlite"))
        async with engine.connect() as conn:
            got = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
        if got != PRAGMA_VALUE[level]:
            self.problems.append(f"{level}: the engine reports synchronous={got}")
        return engine

    # -- 1: the bare database ------------------------------------------------------------

    async def raw_inserts(self, level: str, n: int, batch: int = 100) -> Sample:
        events = Events.make(n)
        now = utcnow().isoformat(sep=" ")
        inbox = [
            (f"{EVENT_TYPE}:{i}", hashlib.sha256(body).hexdigest(), i, EVENT_TYPE, now)
            for i, body in zip(events.ids, events.bodies, strict=True)
        ]
        things = [(i, f"usr_{i[:8]}") for i in events.ids]
        async with AsyncExitStack() as stack:
            engine = await self.fresh(stack, level)
            path = str(engine.url.database)
            async with aiosqlite.connect(path) as db:
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute(f"PRAGMA synchronous={level}")
                meter = Meter(broker=False)
                meter.start()
                start = time.perf_counter()
                for at in range(0, n, batch):
                    await db.executemany(
                        "INSERT INTO tributary_inbox "
                        "(key, payload_hash, event_id, event_type, processed_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        inbox[at : at + batch],
                    )
                    await db.executemany(
                        "INSERT INTO bench_things (event_id, user_id) VALUES (?, ?)",
                        things[at : at + batch],
                    )
                    await db.commit()
                sample = meter.stop(n, time.perf_counter() - start)
            await self.check(engine, n, f"raw {level}")
        return sample

    # -- 2 and 3: the runtime ----------------------------------------------------------------

    async def runtime(self, level: str, batch_max: int, n: int) -> Sample:
        top = Topology.fresh(self.url, batch_max=batch_max)
        try:
            await prefill(self.url, top.queues.work, top.work_arguments, Events.make(n))
            async with AsyncExitStack() as stack:
                engine = await self.fresh(stack, level)
                clock = MeteredClock(n)
                what = f"runtime {level} batch_max={batch_max}"
                await consume_with_runtime(engine, top, clock, max(120.0, n / 40), what)
                if clock.unexpected:
                    self.problems.append(f"runtime {level}: {clock.unexpected[:3]}")
                await self.check(engine, n, f"runtime {level} batch_max={batch_max}")
            return clock.sample
        finally:
            await top.delete()

    async def check(self, engine: AsyncEngine, n: int, what: str) -> None:
        rows = await count_rows(engine, "SELECT count(*) FROM bench_things")
        inbox = await count_rows(engine, "SELECT count(*) FROM tributary_inbox")
        if rows != n or inbox != n:
            self.problems.append(f"{what}: {rows} rows, {inbox} inbox rows for {n} messages")

    async def rounds(
        self, what: str, figure: Callable[[str, int], Awaitable[Sample]], n: int, count: int
    ) -> dict[str, Sample]:
        """Each level ``count`` times on ``n // count`` messages, the order rotating."""
        each = n // count
        total: dict[str, Sample] = {}
        started = time.perf_counter()
        for r in range(count):
            for level in LEVELS[r % 2 :] + LEVELS[: r % 2]:
                got = await figure(level, each)
                total[level] = total[level] + got if level in total else got
        shown = ", ".join(
            f"{level} {s.rate:,.0f} msg/s {s.us(s.cpu):.0f} µs CPU/msg"
            for level, s in total.items()
        )
        elapsed = time.perf_counter() - started
        say(f"  {what} ({count} rounds of {each:,}): {shown}   [{elapsed:.0f} s]")
        return total


def rows_for(
    what: str, got: dict[str, Sample], baseline: dict[str, Sample] | None, *, broker: bool
) -> list[Row]:
    """Throughput and CPU per message for NORMAL and FULL (each level against the bare
    database at the same level, when given); then FULL against NORMAL, like for like."""
    normal, full = got["NORMAL"], got["FULL"]

    def cpu(s: Sample, on_broker: bool = broker) -> str:
        return cpu_cell(s, broker=on_broker)

    out = []
    for level, s in got.items():
        base = baseline[level] if baseline else None
        out.append(
            Row(
                f"{what}, {level}: throughput",
                f"{s.rate:,.0f} msg/s",
                cpu(s),
                f"bare database, {level}: {base.rate:,.0f} msg/s" if base else "—",
                cpu(base, False) if base else "—",
                f"{s.rate / base.rate:.0%}" if base else "—",
            )
        )
    out += [
        Row(
            f"{what}: FULL vs NORMAL throughput",
            f"{full.rate:,.0f} msg/s",
            cpu(full),
            f"the same at NORMAL: {normal.rate:,.0f} msg/s",
            cpu(normal),
            f"{full.rate / normal.rate:.0%}",
        ),
        Row(
            f"{what}: CPU per message (this process), FULL vs NORMAL",
            f"{full.us(full.cpu):,.0f} µs",
            "—",
            f"the same at NORMAL: {normal.us(normal.cpu):,.0f} µs",
            "—",
            f"{full.us(full.cpu) - normal.us(normal.cpu):+,.0f} µs",
        ),
    ]
    return out


def filesystem(path: Path) -> str:
    """The mount (device, type) holding ``path``: fsync costs depend on it."""
    best = ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, kind, *_ = line.split()
        if str(path.resolve()).startswith(mount) and len(mount) >= len(best[2]):
            best = (device, kind, mount)
    return f"{best[1]} on {best[0]}"


async def main(args: argparse.Namespace) -> str:
    quick = args.quick
    n, n_raw, n_single = (2_000, 4_000, 200) if quick else (args.n, args.n * 2, args.n_single)
    with ExitStack() as infra:
        url = find_rabbitmq(infra).url
        async with databases("") as dbs:  # SQLite only: no PostgreSQL server needed
            section = Section(
                "## SQLite durability: `synchronous=FULL` against `NORMAL`",
                "bench.sqlite_sync_bench",
                versions(
                    ["uvloop", "aio-pika", "aiormq", "sqlalchemy", "aiosqlite", "pydantic"],
                    {"RabbitMQ": await rabbitmq_version(url), "SQLite": sqlite_version()},
                ),
                quick=quick or n < 2_000,
            )
            section.settings += [
                f"N = {n:,} per runtime figure (bare database {n_raw:,}, per-message commits "
                f"{n_single:,}), each level the same count, 2 interleaved rounds (order "
                "rotating), a fresh database file each; 1 KB persistent `user.created.v2`; "
                "event loop: uvloop",
                f"databases in a temporary folder on {filesystem(dbs.tmp)} (fsync costs "
                "depend on it)",
                "CPU per message: this process (every thread) over the rate's window (first "
                "to last completion); runtime figures also the RabbitMQ server's",
                "like for like: each level against the other with the same code, N and file "
                "system; the runtime's group commit against the bare database at the same level",
            ]
            say(section.stamp)
            say(section.versions)
            bench = SyncBench(url, dbs)
            raw = await bench.rounds("1 bare database, commit per 100", bench.raw_inserts, n_raw, 2)

            async def grouped(level: str, each: int) -> Sample:
                return await bench.runtime(level, 100, each)

            async def single(level: str, each: int) -> Sample:
                return await bench.runtime(level, 1, each)

            group = await bench.rounds("2 runtime, batch_max=100", grouped, n, 2)
            one = await bench.rounds("3 runtime, batch_max=1", single, n_single, 2)
            rows = [
                *rows_for("1 bare database (aiosqlite, commit per 100)", raw, None, broker=False),
                *rows_for("2 runtime group commit (batch_max=100)", group, raw, broker=True),
                *rows_for("3 runtime, a commit per message (batch_max=1)", one, None, broker=True),
            ]
            section.add(results_table(rows))
            section.problems += bench.problems
            return section.markdown()


def cli(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run (N=2,000)")
    parser.add_argument("-n", type=int, default=10_000, help="messages per runtime figure")
    parser.add_argument(
        "--n-single", type=int, default=600, help="messages for the per-message-commit figure"
    )
    args = parser.parse_args(argv)
    print_section(uvloop.run(main(args)), args.write, MARKER)  # the services run on uvloop too


if __name__ == "__main__":
    cli()
