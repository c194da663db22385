"""SQLite drivers: the runtime's one-round-trip-a-statement adapter against SQLAlchemy's.

    uv run python -m bench.sqlite_driver_bench [--quick] [-n N] [--write FILE]

Prints figures and ratios; asserts nothing. Each figure runs the same transaction as a consumer
handling one event -- look the event up in the inbox, insert the inbox row, a domain row and an
outbox row, commit -- N times on a fresh WAL database file (``synchronous`` as the services run
it), on uvloop, through:

  1  bare sqlite3 on the event loop's thread: the floor, no async at all
  2  SQLAlchemy's aiosqlite adapter (``sqlite+aiosqlite`` as shipped): an AsyncSession
  3  the runtime's adapter (``tributary.messaging.sqlite_driver``): the same AsyncSession code

Figures 2 and 3 run interleaved in rounds with the order rotating, so a noisy neighbour hits
both alike. CPU is this process's CPU time (every thread, so aiosqlite's worker threads count)
per transaction; round trips are calls handed to aiosqlite's worker thread, counted in a
separate pass.
"""

from __future__ import annotations

import argparse
import platform
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import uvloop
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from bench.common import package_version, run_stamp
from bench.report import bench_parser, print_section
from tributary.messaging.db import create_engine, sqlite_synchronous

SCHEMA = [
    "CREATE TABLE inbox (id TEXT PRIMARY KEY, consumer TEXT, hash TEXT, at REAL)",
    "CREATE TABLE things (id TEXT PRIMARY KEY, owner TEXT, body TEXT)",
    "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, key TEXT, body BLOB, at REAL)",
]
LOOKUP = "SELECT id FROM inbox WHERE id = :id AND consumer = :consumer"
INBOX = "INSERT INTO inbox (id, consumer, hash, at) VALUES (:id, :consumer, :hash, :at)"
THING = "INSERT INTO things (id, owner, body) VALUES (:id, :owner, :body)"
OUTBOX = "INSERT INTO outbox (key, body, at) VALUES (:key, :body, :at)"
BODY = b"x" * 1024


def params(i: int) -> dict[str, Any]:
    key = f"{uuid.uuid4()}-{i}"
    return {
        "id": key,
        "consumer": "bench",
        "hash": "0" * 64,
        "at": time.time(),
        "owner": "u" * 26,
        "body": "y" * 200,
        "key": key,
    }


@dataclass
class Figure:
    label: str
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    count: int = 0

    def add(self, n: int, cpu: float, wall: float) -> None:
        self.count += n
        self.cpu.append(cpu)
        self.wall.append(wall)

    def us_cpu(self) -> float:
        return sum(self.cpu) / self.count * 1e6

    def rate(self) -> float:
        return self.count / sum(self.wall)


def fresh_file(tmp: Path) -> Path:
    path = tmp / f"{uuid.uuid4().hex}.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA:
            db.execute(statement)
    return path


async def measure(n: int, body: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        await body(i)
    return time.process_time() - cpu, time.perf_counter() - wall


async def bare(path: Path, n: int) -> tuple[float, float]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA synchronous={sqlite_synchronous()}")

    async def one(i: int) -> None:
        p = params(i)
        db.execute("BEGIN")
        db.execute(LOOKUP, p).fetchall()
        db.execute(INBOX, p)
        db.execute(THING, p)
        db.execute(OUTBOX, {**p, "body": BODY})
        db.execute("COMMIT")

    try:
        return await measure(n, one)
    finally:
        db.close()


def stock_engine(path: Path) -> AsyncEngine:
    return create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 30})


def runtime_engine(path: Path) -> AsyncEngine:
    return create_engine(f"sqlite+aiosqlite:///{path}")


async def through(engine: AsyncEngine, n: int) -> tuple[float, float]:
    async with engine.connect() as conn:  # connected and set up before the clock starts
        await conn.execute(text(f"PRAGMA synchronous={sqlite_synchronous()}"))

    async def one(i: int) -> None:
        p = params(i)
        async with AsyncSession(engine) as session, session.begin():
            (await session.execute(text(LOOKUP), p)).all()
            await session.execute(text(INBOX), p)
            await session.execute(text(THING), p)
            await session.execute(text(OUTBOX), {**p, "body": BODY})

    try:
        return await measure(n, one)
    finally:
        await engine.dispose()


async def round_trips(make: Callable[[Path], AsyncEngine], tmp: Path, n: int) -> float:
    """Calls handed to aiosqlite's worker thread per transaction."""
    calls = 0
    original = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await original(self, fn, *args, **kwargs)

    engine = make(fresh_file(tmp))
    async with engine.connect():
        pass
    aiosqlite.Connection._execute = counted  # type: ignore[method-assign]
    try:
        await through(engine, n)
    finally:
        aiosqlite.Connection._execute = original  # type: ignore[method-assign]
    return calls / n


async def main(args: argparse.Namespace) -> str:
    n, rounds = (500, 2) if args.quick else (args.n, args.rounds)
    lines = [
        "### SQLite drivers: one round trip a statement",
        "",
        f"`python -m bench.sqlite_driver_bench` -- {run_stamp()}; "
        f"Python {platform.python_version()}, SQLAlchemy {package_version('sqlalchemy')}, "
        f"aiosqlite {package_version('aiosqlite')}, "
        f"SQLite {sqlite3.sqlite_version}, synchronous={sqlite_synchronous()}, uvloop; "
        f"{n:,} transactions a figure and round, {rounds} rounds.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        figures = {
            "bare": Figure("1 bare sqlite3, same thread (floor)"),
            "stock": Figure("2 SQLAlchemy's aiosqlite adapter"),
            "runtime": Figure("3 the runtime's adapter"),
        }
        contenders: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
            "bare": lambda: bare(fresh_file(tmp), n),
            "stock": lambda: through(stock_engine(fresh_file(tmp)), n),
            "runtime": lambda: through(runtime_engine(fresh_file(tmp)), n),
        }
        order = list(contenders)
        for r in range(rounds):
            for name in order[r % 3 :] + order[: r % 3]:
                cpu, wall = await contenders[name]()
                figures[name].add(n, cpu, wall)
        trips = {
            "stock": await round_trips(stock_engine, tmp, 200),
            "runtime": await round_trips(runtime_engine, tmp, 200),
        }
    floor = figures["bare"].us_cpu()
    stock = figures["stock"].us_cpu()
    lines += [
        "| figure | CPU per transaction | transactions/s | thread round trips per transaction "
        "| CPU against the floor | CPU against SQLAlchemy's adapter |",
        "|---|---|---|---|---|---|",
    ]
    for name, figure in figures.items():
        cpu = figure.us_cpu()
        trip = f"{trips[name]:.1f}" if name in trips else "0"
        vs_stock = "—" if name == "bare" else f"{cpu / stock:.2f}x"
        lines.append(
            f"| {figure.label} | {cpu:,.0f} µs | {figure.rate():,.0f} | {trip} "
            f"| {cpu / floor:.1f}x | {vs_stock} |"
        )
    return "\n".join(lines)


def cli() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run (500 transactions)")
    parser.add_argument("-n", type=int, default=3_000, help="transactions per figure and round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    args = parser.parse_args()
    print_section(uvloop.run(main(args)), args.write, "sqlite-driver-bench")


if __name__ == "__main__":
    cli()
