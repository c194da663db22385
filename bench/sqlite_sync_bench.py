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
(every thread) over the same span, per message.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.common import (
    Clock,
    Databases,
    Events,
    Row,
    count_rows,
    databases,
    package_version,
    prefill,
    rabbitmq_version,
    results_table,
    run_stamp,
)
from bench.messaging_bench import SERVICE, Topology, on_user_created
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.db import SQLITE_SYNCHRONOUS_ENV, utcnow
from tributary.testkit.infra import find_rabbitmq

LEVELS = ("NORMAL", "FULL")
PRAGMA_VALUE = {"NORMAL": 1, "FULL": 2}
EVENT_TYPE = "com.tributary.user.created.v2"


def say(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Sample:
    """``count`` messages in ``seconds`` of wall time and ``cpu`` seconds of process CPU."""

    count: int
    seconds: float
    cpu: float

    def __add__(self, other: Sample) -> Sample:
        return Sample(self.count + other.count, self.seconds + other.seconds, self.cpu + other.cpu)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.count * 1e6 if self.count else float("nan")


class CpuClock(Clock):
    """A :class:`Clock` that also notes process CPU time at the first and last completion."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.cpu_first: float | None = None
        self.cpu_last: float | None = None

    def tick(self) -> None:
        cpu = time.process_time()
        if self.cpu_first is None:
            self.cpu_first = cpu
        self.cpu_last = cpu
        super().tick()

    @property
    def sample(self) -> Sample:
        measured = self.measured
        cpu = (self.cpu_last or 0.0) - (self.cpu_first or 0.0)
        return Sample(measured.count, measured.seconds, cpu)


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
                cpu, start = time.process_time(), time.perf_counter()
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
                sample = Sample(n, time.perf_counter() - start, time.process_time() - cpu)
            await self.check(engine, n, f"raw {level}")
        return sample

    # -- 2 and 3: the runtime ----------------------------------------------------------------

    async def runtime(self, level: str, batch_max: int, n: int) -> Sample:
        top = Topology.fresh(self.url, batch_max=batch_max)
        try:
            await prefill(self.url, top.queues.work, top.work_arguments, Events.make(n))
            async with AsyncExitStack() as stack:
                engine = await self.fresh(stack, level)
                clock = CpuClock(n)
                bus = Bus(
                    SERVICE,
                    engine,
                    handlers={UserCreatedV2: on_user_created},
                    settings=top.settings,
                )
                bus.listeners.append(clock)
                await bus.start()
                try:
                    await clock.wait(max(120.0, n / 40), f"runtime {level} batch_max={batch_max}")
                finally:
                    await bus.stop()
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
        total = {level: Sample(0, 0.0, 0.0) for level in LEVELS}
        started = time.perf_counter()
        for r in range(count):
            for level in LEVELS[r % 2 :] + LEVELS[: r % 2]:
                total[level] += await figure(level, each)
        shown = ", ".join(
            f"{level} {s.rate:,.0f} msg/s {s.cpu_us:.0f} µs CPU/msg" for level, s in total.items()
        )
        elapsed = time.perf_counter() - started
        say(f"  {what} ({count} rounds of {each:,}): {shown}   [{elapsed:.0f} s]")
        return total


def rows_for(what: str, got: dict[str, Sample], baseline: dict[str, Sample] | None) -> list[Row]:
    """Throughput and CPU per message for NORMAL and FULL; FULL is read against NORMAL."""
    normal, full = got["NORMAL"], got["FULL"]
    out = []
    for level, s in got.items():
        base = baseline[level] if baseline else None
        out.append(
            Row(
                f"{what}, {level}: throughput",
                f"{s.rate:,.0f} msg/s",
                f"{base.rate:,.0f} msg/s (bare database)" if base else "—",
                f"{s.rate / base.rate:.0%}" if base else "—",
            )
        )
    out += [
        Row(
            f"{what}: FULL vs NORMAL throughput",
            f"{full.rate:,.0f} msg/s",
            f"{normal.rate:,.0f} msg/s",
            f"{full.rate / normal.rate:.0%}",
        ),
        Row(
            f"{what}: CPU per message, FULL vs NORMAL",
            f"{full.cpu_us:.0f} µs",
            f"{normal.cpu_us:.0f} µs",
            f"{full.cpu_us - normal.cpu_us:+.0f} µs",
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


def stamp(rabbit: str, tmp: Path) -> str:
    v = package_version
    return (
        f"Python {platform.python_version()}, aio-pika {v('aio-pika')}, SQLAlchemy "
        f"{v('sqlalchemy')}, aiosqlite {v('aiosqlite')}, SQLite {sqlite3.sqlite_version}; "
        f"RabbitMQ {rabbit}; {os.cpu_count()} CPUs, {platform.platform()}; "
        f"databases in {tmp} ({filesystem(tmp)})"
    )


async def main(args: argparse.Namespace) -> None:
    n, n_raw, n_single = (2_000, 4_000, 200) if args.quick else (args.n, args.n * 2, args.n_single)
    with ExitStack() as infra:
        url = find_rabbitmq(infra).url
        async with databases("") as dbs:  # SQLite only: no PostgreSQL server needed
            say(run_stamp())
            say(stamp(await rabbitmq_version(url), dbs.tmp))
            say(f"N = {n:,} (bare database {n_raw:,}, per-message commits {n_single:,})")
            bench = SyncBench(url, dbs)
            start = time.perf_counter()
            raw = await bench.rounds("1 bare database, commit per 100", bench.raw_inserts, n_raw, 2)

            async def grouped(level: str, each: int) -> Sample:
                return await bench.runtime(level, 100, each)

            async def single(level: str, each: int) -> Sample:
                return await bench.runtime(level, 1, each)

            group = await bench.rounds("2 runtime, batch_max=100", grouped, n, 2)
            one = await bench.rounds("3 runtime, batch_max=1", single, n_single, 2)
            say(f"\nwhole run: {time.perf_counter() - start:.0f} s\n")
            table = [
                *rows_for("1 bare database (aiosqlite, commit per 100)", raw, None),
                *rows_for("2 runtime group commit (batch_max=100)", group, raw),
                *rows_for("3 runtime, a commit per message (batch_max=1)", one, None),
            ]
            say(results_table(table))
            for problem in bench.problems:
                say(f"!! {problem}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (N=2,000)")
    parser.add_argument("-n", type=int, default=10_000, help="messages per runtime figure")
    parser.add_argument(
        "--n-single", type=int, default=600, help="messages for the per-message-commit figure"
    )
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
