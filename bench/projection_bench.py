"""Projection rebuild benchmark: billing's blue/green rebuild against bare SQL on the same database.

    uv run --group bench python -m bench.projection_bench [--quick] [--write FILE]
        [-n N] [--rounds R] [--db sqlite,postgres] [--batch B]

Prints a Markdown section (figures, ratios, checks, stamp); ``--write FILE`` also puts it
between ``<!-- projection-bench:start -->`` and ``<!-- projection-bench:end -->`` in FILE.
Exits 1 (and writes nothing) when a rebuilt table differs from the live one.

The store: N events written through billing's real write path -- subscriptions with mixed
lifecycles (requested, checkout, paid or declined, activated, refunds, cancellations) decided
by the aggregate and saved by ``Billing.save`` (append under the append lock, stream index,
outbox, the live projections updated in the same transaction), 50 subscriptions per unit of
work, on a fresh database brought to head by billing's migrations. The live tables as they
are then are the reference.

Contender: ``tributary.billing.rebuild.rebuild`` of each projection in turn (what
``eventctl projections rebuild`` runs): claim, a fresh table filled in batches of B events
(each its own transaction), catch-up, the swap under the append lock, the old table dropped
(no grace period). Afterwards the new table must equal the reference row by row.

Baseline (same database, same run, rounds interleaved, order rotating): bare SQL through the
same engine -- read the same N store rows in batches of B (``SELECT * FROM event_store WHERE
position > :after ORDER BY position LIMIT B``) and insert one row per event into a plain table
(``executemany``), one transaction per batch. No JSON decoding beyond the driver's, no models,
no projection logic.

Time is wall time around each; CPU is this process (``time.process_time``: every thread, so
aiosqlite's too) and, for PostgreSQL, every server process (``/proc``; the whole server,
other clients included). Figures are per event replayed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, Table, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from bench.common import (
    DB_LABEL,
    DbKind,
    Sample,
    Window,
    database_kinds,
    databases,
    package_version,
    postgres_version,
    run_stamp,
)
from bench.report import Row, bench_parser, print_section, results_table
from services.billing.tests.workload import Workload, billing_with
from tributary.billing.app import create_app
from tributary.billing.models import ProjectionState
from tributary.billing.rebuild import rebuild
from tributary.messaging.db import create_engine, session_factory
from tributary.service.migrations import upgrade
from tributary.testkit.infra import find_postgres

MIGRATIONS = Path(create_app.__code__.co_filename).parent / "migrations"
MARKER = "projection-bench"
LABEL = DB_LABEL
RAW_TABLE = "bench_raw_projection"

Sessions = async_sessionmaker[AsyncSession]


def say(text: str = "") -> None:
    print(text, flush=True)


# -- measuring ---------------------------------------------------------------------------------


async def table_rows(sessions: Sessions, name: str) -> list[tuple[Any, ...]]:
    """Every row of table ``name`` as the database has it, in primary-key order."""
    async with sessions() as session:
        connection = await session.connection()
        table = await connection.run_sync(lambda sync: Table(name, MetaData(), autoload_with=sync))
        query = table.select().order_by(*table.primary_key.columns)
        return [tuple(row) for row in (await connection.execute(query)).all()]


async def serving(sessions: Sessions, name: str) -> tuple[str, int]:
    async with sessions() as session:
        state = await session.get(ProjectionState, name)
    assert state is not None
    return state.table_name, state.position


# -- the contenders ----------------------------------------------------------------------------


@dataclass
class Database:
    kind: DbKind
    engine: AsyncEngine
    sessions: Sessions
    n: int
    names: list[str]
    reference: dict[str, list[tuple[Any, ...]]]
    head: int


async def rebuild_one(db: Database, name: str, batch: int) -> Sample:
    projector = billing_with().projector
    window = Window(database=db.kind == "postgres", broker=False)
    report = await rebuild(db.sessions, projector, name, batch=batch, grace=0)
    sample = window.close(report.events)
    table_name, position = await serving(db.sessions, name)
    if table_name != report.new_table or position != db.head:
        sample.problems.append(f"{name}: serving {table_name} at {position}")
    if report.events != db.n:
        sample.problems.append(f"{name}: {report.events:,} events replayed of {db.n:,}")
    if await table_rows(db.sessions, table_name) != db.reference[name]:
        sample.problems.append(f"{name}: the rebuilt table differs from the live one")
    return sample


async def raw(db: Database, batch: int) -> Sample:
    """Bare SQL: read the store in batches, insert one plain row per event."""
    async with db.engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {RAW_TABLE}"))
        await conn.execute(
            text(
                f"CREATE TABLE {RAW_TABLE} (position BIGINT PRIMARY KEY, "
                "stream_id VARCHAR(60) NOT NULL, type VARCHAR(60) NOT NULL)"
            )
        )
    read = text(
        "SELECT position, event_id, stream_id, version, type, schema_version, data, metadata, "
        "recorded_at FROM event_store WHERE position > :after ORDER BY position LIMIT :limit"
    )
    write = text(f"INSERT INTO {RAW_TABLE} (position, stream_id, type) VALUES (:p, :s, :t)")  # noqa: S608 -- a constant
    window = Window(database=db.kind == "postgres", broker=False)
    after = events = 0
    while True:
        async with db.engine.begin() as conn:
            found = (await conn.execute(read, {"after": after, "limit": batch})).all()
            if not found:
                break
            await conn.execute(
                write, [{"p": r.position, "s": r.stream_id, "t": r.type} for r in found]
            )
        after = found[-1].position
        events += len(found)
    sample = window.close(events)
    if events != db.n:
        sample.problems.append(f"raw: {events:,} rows of {db.n:,}")
    return sample


# -- rounds and the report ---------------------------------------------------------------------


@dataclass
class Figure:
    kind: DbKind
    name: str
    rebuild: Sample
    raw: Sample
    rounds: list[tuple[str, Sample, Sample]]

    @property
    def ratio(self) -> float:
        return self.rebuild.rate / self.raw.rate


async def measure(db: Database, rounds: int, batch: int) -> list[Figure]:
    """Each round: every projection rebuilt, and the bare-SQL baseline (order alternating)."""
    totals: dict[str, Sample] = {}
    raw_total: Sample | None = None
    per_round: dict[str, list[tuple[str, Sample, Sample]]] = {n: [] for n in db.names}
    for r in range(rounds):
        order = ["rebuilds", "raw"] if r % 2 == 0 else ["raw", "rebuilds"]
        got: dict[str, Sample] = {}
        base: Sample | None = None
        for who in order:
            if who == "raw":
                base = await raw(db, batch)
            else:
                for name in db.names:
                    got[name] = await rebuild_one(db, name, batch)
        assert base is not None
        raw_total = base if raw_total is None else raw_total + base
        for name in db.names:
            sample = got[name]
            totals[name] = totals[name] + sample if name in totals else sample
            per_round[name].append((" then ".join(order), sample, base))
            say(
                f"  {LABEL[db.kind]} round {r + 1} ({' then '.join(order)}) {name}: "
                f"{sample.rate:,.0f} events/s {sample.us(sample.cpu):,.0f} µs CPU, raw "
                f"{base.rate:,.0f}/s {base.us(base.cpu):,.0f} µs CPU, "
                f"ratio {sample.rate / base.rate:.0%}"
            )
            for problem in sample.problems:
                say(f"  !! {problem}")
        for problem in base.problems:
            say(f"  !! {problem}")
    assert raw_total is not None
    return [Figure(db.kind, n, totals[n], raw_total, per_round[n]) for n in db.names]


def us(x: float) -> str:
    return f"{x:,.0f} µs"


def figure_rows(f: Figure, n: int, rounds: int) -> list[Row]:
    db = LABEL[f.kind]
    s, r = f.rebuild, f.raw
    flag = "" if not (s.problems or r.problems) else " — **INVALID**"
    rows = [
        Row(
            f"rebuild {f.name}, {db}: events/s ({rounds} x {n:,}){flag}",
            f"{s.rate:,.0f}/s",
            baseline=f"{r.rate:,.0f}/s (bare SQL)",
            ratio=f"{f.ratio:.0%}",
        ),
        Row(
            f"rebuild {f.name}, {db}: CPU per event, this process",
            us(s.us(s.cpu)),
            baseline=us(r.us(r.cpu)),
            ratio=f"{s.cpu / r.cpu:.1f}x" if r.cpu else "—",
        ),
    ]
    if f.kind == "postgres":
        rows.append(
            Row(
                f"rebuild {f.name}, {db}: CPU per event, PostgreSQL server",
                us(s.us(s.database)),
                baseline=us(r.us(r.database)),
                ratio=f"{s.database / r.database:.1f}x" if r.database else "—",
            )
        )
    ratios = [svc.rate / base.rate for _, svc, base in f.rounds]
    rows.append(
        Row(
            f"rebuild {f.name}, {db}: ratio per round, median (min-max)",
            f"{statistics.median(ratios):.0%} ({min(ratios):.0%}-{max(ratios):.0%})",
        )
    )
    return rows


@dataclass
class Report:
    command: str
    stamp: str
    load_after: str
    versions: str
    n: int
    rounds: int
    batch: int
    fills: dict[DbKind, Sample]
    figures: list[Figure]
    seconds: float
    quick: bool

    @property
    def valid(self) -> bool:
        return not any(f.rebuild.problems or f.raw.problems for f in self.figures)

    def markdown(self) -> str:
        rows = [row for f in self.figures for row in figure_rows(f, self.n, self.rounds)]
        for kind, fill in self.fills.items():
            rows.append(
                Row(
                    f"for scale: {self.n:,} events written through `Billing.save`, {LABEL[kind]} "
                    "(append, index, outbox, live projections)",
                    f"{fill.rate:,.0f}/s",
                    baseline="—",
                    ratio="—",
                )
            )
        lines = [
            "## Projection rebuild",
            "",
            "Printed by `bench/projection_bench.py` (its docstring says how it measures); "
            "nothing here is typed by hand.",
            "",
            f"- command: `{self.command}`",
            f"- run: {self.stamp} before, {self.load_after} after; {self.seconds:.0f} s",
            f"- versions: {self.versions}",
            f"- workload: {self.n:,} events in the store per database, written through "
            "billing's real write path (the aggregate's decisions saved by `Billing.save`, 50 "
            "subscriptions per unit of work: mixed lifecycles with payments, declines, "
            f"activations, refunds, cancellations); each projection rebuilt {self.rounds} "
            f"time(s), batches of {self.batch}, no grace period; the rebuilt table compared "
            "row by row with the live one (all equal)",
            "- contender: `tributary.billing.rebuild.rebuild` (what `eventctl projections "
            "rebuild` runs): claim, fresh table, batches, catch-up, swap under the append "
            "lock, old table dropped",
            "- baseline: bare SQL on the same database and engine, same run, rounds "
            "interleaved: read the same store rows in the same batches and insert one plain "
            "row per event (executemany), one transaction per batch",
            "- CPU: this process (every thread) and, on PostgreSQL, every server process",
        ]
        if self.quick:
            lines.append("- **`--quick`: a smoke run, not figures to keep**")
        if not self.valid:
            lines.append("- **a check failed: these figures are not valid**")
        lines += ["", results_table(rows, cpu=False)]
        return "\n".join(lines)


def versions(postgres: str | None) -> str:
    v = package_version
    pg = f"PostgreSQL {postgres}, " if postgres else ""
    return (
        f"Python {platform.python_version()}, SQLAlchemy {v('sqlalchemy')}, SQLModel "
        f"{v('sqlmodel')}, aiosqlite {v('aiosqlite')}, asyncpg {v('asyncpg')}, pydantic "
        f"{v('pydantic')}; {pg}SQLite {sqlite3.sqlite_version}; {os.cpu_count()} CPUs, "
        f"{platform.platform()}"
    )


async def prepared(url: str, kind: DbKind, n: int) -> tuple[Database, Sample]:
    """Billing's tables, N events through the write path, the live tables as reference."""
    await upgrade(MIGRATIONS, url)
    engine = create_engine(url)
    sessions = session_factory(engine)
    billing = billing_with()
    window = Window(database=kind == "postgres", broker=False)
    await Workload(sessions, billing, seed=42, users=200, per_unit=50).append(n)
    fill = window.close(n)
    names = list(billing.projector.projections)
    reference = {}
    async with sessions() as session:
        head = await billing.store.head(session)
    for name in names:
        table_name, position = await serving(sessions, name)
        if position != head:
            raise SystemExit(f"{name} is at {position}, the store at {head}")
        reference[name] = await table_rows(sessions, table_name)
    return Database(kind, engine, sessions, n, names, reference, head), fill


async def main(args: argparse.Namespace) -> Report:
    n = 1_000 if args.quick else args.n
    rounds = 1 if args.quick and args.rounds is None else (args.rounds or 3)
    kinds = database_kinds(args.db)
    command = " ".join(["python", "-m", "bench.projection_bench", *sys.argv[1:]])
    stamp = run_stamp()
    started = time.perf_counter()
    with ExitStack() as infra:
        pg = find_postgres(infra).url if "postgres" in kinds else ""
        pg_version = None
        if pg:
            engine = create_engine(pg)
            try:
                pg_version = await postgres_version(engine)
            finally:
                await engine.dispose()
        stack_versions = versions(pg_version)
        say(command)
        say(stamp)
        say(stack_versions)
        say(f"N = {n:,} events per database, {rounds} round(s), batches of {args.batch}")
        figures: list[Figure] = []
        fills: dict[DbKind, Sample] = {}
        async with databases(pg) as dbs:
            for kind in kinds:
                say(f"[{LABEL[kind]}]")
                async with dbs.fresh_url(kind) as url:
                    db, fills[kind] = await prepared(url, kind, n)
                    say(f"  {n:,} events written in {fills[kind].seconds:.0f} s")
                    try:
                        figures += await measure(db, rounds, args.batch)
                    finally:
                        await db.engine.dispose()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return Report(
        command=command,
        stamp=stamp,
        load_after=f"load average {load}",
        versions=stack_versions,
        n=n,
        rounds=rounds,
        batch=args.batch,
        fills=fills,
        figures=figures,
        seconds=time.perf_counter() - started,
        quick=args.quick,
    )


def cli(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="N=1,000, 1 round: a smoke run")
    parser.add_argument("-n", type=int, default=10_000, help="events in the store")
    parser.add_argument("--rounds", type=int, default=None, help="rebuilds per projection (3)")
    parser.add_argument("--batch", type=int, default=500, help="events per batch (500)")
    parser.add_argument("--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    args = parser.parse_args(argv)
    report = asyncio.run(main(args))
    # an invalid run is shown, never written
    print_section(report.markdown(), args.write if report.valid else None, MARKER)
    if not report.valid:
        say("\n!! a rebuilt table differs from the live one (or a count is off): not written")
        raise SystemExit(1)


if __name__ == "__main__":
    cli()
