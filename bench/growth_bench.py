"""Growth: does the cost of an event stay flat as the tables behind it grow?

    uv run --group bench python -m bench.growth_bench [--quick] [--rows N] [-n N] [--write FILE]

Prints a Markdown section (figures, ratios, stamp); asserts nothing. ``--write FILE`` puts it
between its markers (growth-bench) in FILE.

  1  the runtime consumer (Bus, batch_max=100, a handler adding one row: inbox look-up, inbox
     row, row, commit, ack) from a pre-filled quorum queue, into a database whose inbox holds
     ``--rows`` rows (1,000,000) against an empty one, on SQLite and PostgreSQL. The two run
     interleaved in rounds (order rotating); the ratio is grown/empty.
  2  audit's chain: CPU per append (one transaction each, as a consumer with batch_max=1 does)
     after 10,000 entries and after ``--rows`` entries, on SQLite.
  3  audit's verification from a known checkpoint 1,000 entries back (what a monitor that kept
     the last verified head asks for) after 10,000 and after ``--rows`` entries: it reads the
     entries after the checkpoint, not the whole log. A full verification is linear by nature
     and shown for scale.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sqlite3
import time
from contextlib import AsyncExitStack, ExitStack
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import uvloop
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from bench.common import DbKind, Sample, databases, package_version, run_stamp
from bench.messaging_bench import Bench
from bench.report import bench_parser, print_section
from tributary.audit import chain
from tributary.audit.app import create_app as create_audit_app
from tributary.audit.models import AuditEntry, CheckpointRef
from tributary.messaging.db import create_engine, session_factory
from tributary.service.migrations import upgrade
from tributary.testkit.infra import find_postgres, find_rabbitmq

MARKER = "growth-bench"
LABEL = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
AUDIT_MIGRATIONS = Path(create_audit_app.__code__.co_filename).parent / "migrations"
SMALL = 10_000


def say(line: str) -> None:
    print(line, flush=True)


async def fill_inbox(engine: AsyncEngine, kind: DbKind, rows: int) -> None:
    """``rows`` inbox rows of other events (keys shaped like the runtime's)."""
    if kind == "postgres":
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO tributary_inbox (key, payload_hash, event_id, event_type, "
                    "processed_at) SELECT 'onboarding:old-' || g, md5(g::text) || md5(g::text), "
                    "'old-' || g, 'com.tributary.user.created.v2', now() "
                    "FROM generate_series(1, :n) AS g"
                ),
                {"n": rows},
            )
            await conn.execute(text("ANALYZE tributary_inbox"))
        return
    path = engine.url.database
    assert path is not None
    db = sqlite3.connect(path)
    try:
        db.executemany(
            "INSERT INTO tributary_inbox (key, payload_hash, event_id, event_type, processed_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                (
                    f"onboarding:old-{i}",
                    hashlib.sha256(str(i).encode()).hexdigest(),
                    f"old-{i}",
                    "com.tributary.user.created.v2",
                    "2026-01-01 00:00:00.000000",
                )
                for i in range(rows)
            ),
        )
        db.commit()
        db.execute("ANALYZE")
    finally:
        db.close()


def cpu_us(sample: Sample) -> str:
    return f"{sample.us(sample.cpu):,.0f} µs"


async def consumer_growth(
    bench: Bench, kind: DbKind, rows: int, n: int, rounds: int
) -> tuple[Sample, Sample]:
    async with bench.dbs.fresh(kind) as empty, bench.dbs.fresh(kind) as grown:
        started = time.perf_counter()
        await fill_inbox(grown, kind, rows)
        say(f"  {LABEL[kind]}: {rows:,} inbox rows in {time.perf_counter() - started:.0f} s")
        got = await bench.rounds(
            f"1 consumer, empty inbox vs {rows:,} rows ({LABEL[kind]})",
            {
                "empty": partial(bench.runtime, empty, batch_max=100),
                "grown": partial(bench.runtime, grown, batch_max=100),
            },
            n,
            rounds,
        )
    return got["empty"], got["grown"]


def an_entry(n: int) -> AuditEntry:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    return AuditEntry(
        event_id=f"evt-{n}",
        type="com.tributary.workspace.created.v1",
        data_type="workspace.created.v1",
        source="/services/onboarding",
        subject=f"workspaces/ws_{n:012d}",
        correlation_id=f"corr-{n}",
        event_time=moment,
        recorded_at=moment,
        data={"workspace_id": f"ws_{n:012d}", "owner_id": f"usr_{n:012d}", "name": "w***"},
    )


async def grow_chain(engine: AsyncEngine, upto: int) -> None:
    """Append entries until the chain holds ``upto``: hashed as ``chain.append`` does, inserted
    in bulk (appending a million one by one would take most of an hour)."""
    sessions = session_factory(engine)
    async with sessions() as session:
        last = await chain.head(session)
    have, prev = last.seq, last.hash
    table = AuditEntry.__table__  # type: ignore[attr-defined]
    while have < upto:
        rows = []
        for n in range(have + 1, min(have + 5_000, upto) + 1):
            entry = an_entry(n)
            entry.seq, entry.prev_hash = n, prev
            entry.hash = prev = chain.entry_hash(entry, prev)
            rows.append(entry.model_dump())
        async with engine.begin() as conn:
            await conn.execute(table.insert(), rows)
        have += len(rows)


async def append_cost(engine: AsyncEngine, count: int) -> Sample:
    sessions = session_factory(engine)
    async with sessions() as session:
        first = (await chain.head(session)).seq + 1
    wall, cpu = time.perf_counter(), time.process_time()
    for n in range(first, first + count):
        async with sessions() as session, session.begin():
            await chain.append(session, an_entry(n))
    return Sample(count, time.perf_counter() - wall, time.process_time() - cpu)


async def verify_cost(engine: AsyncEngine, back: int, *, full: bool) -> tuple[float, int]:
    """Seconds of CPU for one verification, and how many entries it checked."""
    sessions = session_factory(engine)
    async with sessions() as session:
        head = (await chain.head(session)).seq
        at = head - back
        known_hash = (
            await session.exec(select(AuditEntry.hash).where(col(AuditEntry.seq) == at))
        ).one()
        known = None if full else CheckpointRef(seq=at, head=known_hash)
        cpu = time.process_time()
        result = await chain.verify(session, known=known)
        spent = time.process_time() - cpu
    if not result.ok:
        raise RuntimeError(f"the chain did not verify: {result.reason}")
    return spent, result.entries - (0 if full else at)


async def audit_growth(tmp: Path, rows: int, appends: int) -> list[str]:
    url = f"sqlite+aiosqlite:///{tmp / 'audit-growth.db'}"
    await upgrade(AUDIT_MIGRATIONS, url)
    engine = create_engine(url)
    lines: list[str] = []
    try:
        marks: dict[int, tuple[Sample, float, float, int]] = {}
        for size in (SMALL, rows):
            started = time.perf_counter()
            await grow_chain(engine, size)
            say(f"  audit chain grown to {size:,} entries in {time.perf_counter() - started:.0f} s")
            appended = await append_cost(engine, appends)
            incremental, _ = await verify_cost(engine, 1_000, full=False)
            full, checked = (
                await verify_cost(engine, 0, full=True) if size == SMALL else (float("nan"), 0)
            )
            marks[size] = (appended, incremental, full, checked)
        small, large = marks[SMALL], marks[rows]
        ratio = small[0].us(small[0].cpu), large[0].us(large[0].cpu)
        lines += [
            f"| 2 audit append (own transaction), SQLite, after {rows:,} entries "
            f"| {ratio[1]:,.0f} µs CPU | after {SMALL:,}: {ratio[0]:,.0f} µs CPU "
            f"| {ratio[1] / ratio[0]:.2f} | ≤ 1.15 | {verdict(ratio[1] / ratio[0] <= 1.15)} |",
            f"| 3 verify the last 1,000 entries from a known checkpoint, after {rows:,} "
            f"| {large[1] * 1000:,.1f} ms CPU | after {SMALL:,}: {small[1] * 1000:,.1f} ms CPU "
            f"| {large[1] / small[1]:.2f} | ≤ 1.15 | {verdict(large[1] / small[1] <= 1.15)} |",
            f"| 3 full verification, for scale, after {SMALL:,} "
            f"| {small[2] * 1000:,.0f} ms CPU ({small[2] / small[3] * 1e6:,.0f} µs an entry) "
            "| — | — | linear by nature | — |",
        ]
    finally:
        await engine.dispose()
    return lines


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


async def main(args: argparse.Namespace) -> str:
    rows, n, rounds = (100_000, 2_000, 2) if args.quick else (args.rows, args.n, args.rounds)
    lines = [
        "## Growth: the cost of an event as the tables grow",
        "",
        f"`python -m bench.growth_bench{' --quick' if args.quick else ''}` -- {run_stamp()}",
        "",
        f"Python {platform.python_version()}, SQLAlchemy {package_version('sqlalchemy')}, "
        f"aiosqlite {package_version('aiosqlite')}, asyncpg {package_version('asyncpg')}, "
        f"aio-pika {package_version('aio-pika')}, uvloop {package_version('uvloop')}, "
        f"SQLite {sqlite3.sqlite_version}. Consumer: {n:,} messages per contender in "
        f"{rounds} interleaved rounds; CPU is this process's (every thread) per message.",
        "",
        "| figure | value | baseline | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    with ExitStack() as infra:
        url = find_rabbitmq(infra).url
        pg = find_postgres(infra).url
        async with AsyncExitStack() as stack:
            dbs = await stack.enter_async_context(databases(pg))
            bench = Bench(url, dbs, quick=args.quick)
            for kind in args.db:
                empty, grown = await consumer_growth(bench, kind, rows, n, rounds)
                ratio = grown.rate / empty.rate
                lines.append(
                    f"| 1 consumer, inbox of {rows:,} rows, {LABEL[kind]} "
                    f"| {grown.rate:,.0f} msg/s, {cpu_us(grown)} CPU "
                    f"| empty inbox: {empty.rate:,.0f} msg/s, {cpu_us(empty)} CPU "
                    f"| {ratio:.0%} | ≥ 85 % | {verdict(ratio >= 0.85)} |"
                )
            lines += await audit_growth(dbs.tmp, rows, 300 if args.quick else 1_000)
    return "\n".join(lines)


def cli() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 2,000 messages")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the grown tables")
    parser.add_argument("-n", type=int, default=10_000, help="messages per consumer contender")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument(
        "--db",
        type=lambda v: [k.strip() for k in v.split(",")],
        default=["sqlite", "postgres"],
        help="sqlite,postgres",
    )
    args = parser.parse_args()
    print_section(uvloop.run(main(args)), args.write, MARKER)


if __name__ == "__main__":
    cli()
