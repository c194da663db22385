"""Onboarding's memory as events accumulate: RSS after 2k, 10k, 30k, 50k user.created events.

    uv run --group bench python -m bench.rss_bench [--checkpoints 2000,10000,30000,50000]
        [--in-flight 32] [--base REV] [--env KEY=VALUE] [--in-process] [--write FILE]

How it measures: the real onboarding service (``python -m tributary.onboarding``: uvicorn,
uvloop, migrations, the bus and its outbox relay, default messaging settings, tracing off) on a
fresh SQLite file, under a fresh broker name prefix on the local RabbitMQ. The bench publishes
distinct ``user.created.v2`` events (~1 KB, one user each) to the prefix's events exchange,
keeping ``--in-flight`` (32, as the sign-up bench's POSTs in flight) events between publish and
the ``workspace.created`` the relay publishes for it (counted on an exclusive queue bound to
``workspace.created.#``): the service sees the trickle of small batches a sign-up flow gives it,
not one backlog. When every event up to a checkpoint has its ``workspace.created``, it reads
``VmRSS``, ``RssAnon`` and ``RssFile`` from ``/proc/<pid>/status`` and the process's user+system
CPU from ``/proc/<pid>/stat`` (CPU per event is over the events since the previous checkpoint).
Growth is from the first checkpoint (after the start-up allocations and warm caches) to each
later one.

``--base REV`` runs the same on an earlier commit first (a temporary ``git worktree``, its
sources first on ``PYTHONPATH``, same virtualenv): before/after in one run. ``--env KEY=VALUE``
adds environment to the service (experiments: ``--env MALLOC_ARENA_MAX=2``).

``--in-process`` runs the service's app in this process instead (its lifespan on this event
loop, same settings) with ``tracemalloc`` on, and prints the allocation sites whose live memory
grew most between the first and the last checkpoint, and the live objects per type that grew
(``gc``): for finding a cause, not for figures (tracing slows everything and the RSS includes
the bench's own).
"""

from __future__ import annotations

import _sqlite3
import argparse
import asyncio
import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from bench.common import cpu_seconds, run_stamp
from bench.report import bench_parser, load_average, print_section, versions
from bench.signup_ab import commit_of, source_path
from tributary.contracts.envelope import new_event
from tributary.contracts.events import Payload, UserCreatedV1, UserCreatedV2
from tributary.messaging.publisher import event_message
from tributary.messaging.testing import delete_prefixed
from tributary.messaging.topology import Names, declare_exchanges
from tributary.testkit.infra import find_rabbitmq
from tributary.testkit.processes import ServiceProcess, free_port, service_env

ROOT = Path(__file__).resolve().parent.parent
MARKER = "rss-bench"
SERVICE = "onboarding"
BINDING = "workspace.created.#"
CHUNK = 1_000
"""Events made at a time (each ~1 KB; 50,000 at once would weigh on the bench's own memory)."""
FLAT = 0.05
TIERS = 3
DB_FILE = "onboarding.db"
"""The runtime's default retry tiers: the service's queues to delete afterwards."""


def say(text: str = "") -> None:
    print(text, flush=True)


def status_kib(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` of ``pid`` (KiB)."""
    wanted = ("VmRSS", "RssAnon", "RssFile")
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            values[key] = int(rest.split()[0])
    return values


def sqlite_memory_used() -> Callable[[], int]:
    """SQLite's ``sqlite3_memory_used()`` in this process: the bytes the library has allocated
    (page caches, prepared statements, schemas) and not freed, for every connection."""
    library = ctypes.CDLL(_sqlite3.__file__)
    used = library.sqlite3_memory_used
    used.restype = ctypes.c_int64
    return lambda: int(used())


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


async def read_burst(
    base_url: str,
    requests: int,
    concurrency: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """``requests`` readiness checks (each reads the database through the pool),
    ``concurrency`` at a time: the pool opens as many connections as a burst of API reads
    does (the sign-up bench's latency figure reads each workspace back, 8 at a time)."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, transport=transport) as client:

        async def one() -> None:
            async with limit:
                (await client.get("/health/ready")).raise_for_status()

        await asyncio.gather(*(one() for _ in range(requests)))


@dataclass
class Mark:
    events: int
    rss: dict[str, int]
    cpu: float
    """CPU seconds of the service process so far (in-process: this process)."""
    seconds: float


@dataclass
class Run:
    label: str
    marks: list[Mark] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def growth(self, key: str = "VmRSS") -> float:
        first, last = self.marks[0].rss[key], self.marks[-1].rss[key]
        return last / first - 1


class Feeder:
    """Publishes distinct user.created events, ``in_flight`` at most without their
    workspace.created, and counts the workspace.created the service publishes."""

    def __init__(self, url: str, names: Names, in_flight: int, version: int) -> None:
        self.version = version
        self.url = url
        self.names = names
        self.in_flight = in_flight
        self.published = 0
        self.received = 0
        self._room = asyncio.Semaphore(in_flight)
        self._arrived = asyncio.Condition()
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def open(self) -> None:
        connection = await aio_pika.connect_robust(self.url)
        self._connection = connection
        await declare_exchanges(connection, self.names)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self.names.exchange, BINDING)
        await queue.consume(self._on_workspace, no_ack=True)
        publishing = await connection.channel(publisher_confirms=True)
        self._exchange = await publishing.get_exchange(self.names.exchange, ensure=False)

    async def _on_workspace(self, message: AbstractIncomingMessage) -> None:
        self.received += 1
        self._room.release()
        async with self._arrived:
            self._arrived.notify_all()

    async def feed_until(self, total: int, timeout: float) -> None:
        """Publish until ``total`` events are out, and wait until each has its
        workspace.created."""
        while self.published < total:
            messages = sign_ups(min(CHUNK, total - self.published), self.version)
            await asyncio.gather(*(self._publish(m) for m in messages))
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: self.received >= total)

    async def _publish(self, message: aio_pika.Message) -> None:
        assert self._exchange is not None
        await self._room.acquire()
        self.published += 1
        routing_key = f"user.created.v{self.version}"
        await self._exchange.publish(message, routing_key, mandatory=True)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


def sign_ups(n: int, version: int) -> list[aio_pika.Message]:
    """``n`` user.created events as identity's relay publishes them: a user, a correlation id
    and an event id of their own each (``version`` 1: what identity sends today; 2: the
    version onboarding's handler is written for)."""
    messages: list[aio_pika.Message] = []
    now = datetime.now(UTC)
    for _ in range(n):
        user_id = f"usr_{uuid.uuid4().hex}"
        common: dict[str, Any] = {
            "user_id": user_id,
            "email": f"{user_id}@example.com",
            "plan": "free",
            "locale": "en-GB",
            "created_at": now,
        }
        data: Payload = (
            UserCreatedV1(**common, name="Ada Lovelace")
            if version == 1
            else UserCreatedV2(**common, given_name="Ada", family_name="Lovelace")
        )
        correlation = str(uuid.uuid4())
        event = new_event(
            routing_key=f"user.created.v{version}",
            source="/services/identity",
            data=data,
            subject=f"users/{user_id}",
            correlationid=correlation,
            causationid=correlation,
        )
        messages.append(
            event_message(
                event.to_bytes(),
                event_id=event.id,
                routing_key=f"user.created.v{version}",
                app_id="identity",
                correlation_id=correlation,
                timestamp=now,
                headers={},
            )
        )
    return messages


def service_values(prefix: str, url: str, db_url: str, port: int) -> dict[str, str]:
    return {
        "RABBITMQ_URL": url,
        "TRIBUTARY_NAME_PREFIX": prefix,
        "ONBOARDING_DATABASE_URL": db_url,
        "ONBOARDING_PORT": str(port),
        "OTEL_SDK_DISABLED": "true",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


@asynccontextmanager
async def prefixed(url: str) -> AsyncIterator[Names]:
    names = Names(f"rss{uuid.uuid4().hex[:8]}.")
    try:
        yield names
    finally:
        qs = names.service_queues(SERVICE, TIERS)
        await delete_prefixed(url, names, [qs.work, qs.dlq, *qs.retries])


async def measure(
    feeder: Feeder,
    checkpoints: Sequence[int],
    read: Callable[[], tuple[dict[str, int], float]],
    after_first: Callable[[], Awaitable[bool]] | None = None,
    at_mark: Callable[[int], None] | None = None,
) -> list[Mark]:
    marks: list[Mark] = []
    started = time.perf_counter()
    for c in checkpoints:
        await feeder.feed_until(c, timeout=max(300.0, c / 20))
        rss, cpu = read()
        marks.append(Mark(c, rss, cpu, time.perf_counter() - started))
        say(
            f"    {c:>7,} events: VmRSS {rss['VmRSS'] / 1024:6.1f} MiB, "
            f"RssAnon {rss['RssAnon'] / 1024:6.1f} MiB, {rss['threads']} threads, "
            f"{time.perf_counter() - started:5.0f} s"
        )
        if at_mark is not None:
            at_mark(c)
        if after_first is not None and len(marks) == 1 and await after_first():
            rss, cpu = read()
            say(
                f"    after the reads: VmRSS {rss['VmRSS'] / 1024:6.1f} MiB, "
                f"RssAnon {rss['RssAnon'] / 1024:6.1f} MiB, {rss['threads']} threads"
            )
    return marks


async def run_process(
    label: str, url: str, tree: Path | None, checkpoints: Sequence[int], args: argparse.Namespace
) -> Run:
    """The service as a real process (``tree``: an earlier commit's sources)."""
    say(f"  {label}")
    async with prefixed(url) as names:
        with tempfile.TemporaryDirectory(prefix="rss-bench-") as tmp:
            port = free_port()
            values = service_values(names.prefix, url, f"sqlite+aiosqlite:///{tmp}/{DB_FILE}", port)
            values.update(dict(kv.split("=", 1) for kv in args.env))
            if tree is not None:
                values["PYTHONPATH"] = source_path(tree)
            process = ServiceProcess(SERVICE, port, service_env(values), Path(tmp) / "log")
            feeder = Feeder(url, names, args.in_flight, args.version)
            await feeder.open()
            process.start()
            try:
                await asyncio.to_thread(process.wait_ready)
                assert process.process is not None
                pid = process.process.pid

                def read() -> tuple[dict[str, int], float]:
                    kib = status_kib(pid)
                    kib.update(threads=threads(pid))
                    return kib, cpu_seconds(pid)

                async def burst() -> bool:
                    if args.reads:
                        await read_burst(process.url, args.reads, args.read_concurrency)
                    return bool(args.reads)

                run = Run(label, await measure(feeder, checkpoints, read, burst))
            finally:
                process.stop()
                await feeder.close()
                if problems := [ln for ln in process.log_text().splitlines() if "ERROR" in ln]:
                    say(f"    !! {len(problems)} error lines, first: {problems[0][:300]}")
    return run


async def run_in_process(url: str, checkpoints: Sequence[int], args: argparse.Namespace) -> Run:
    """The app in this process, with tracemalloc and gc counts at each checkpoint."""
    from tributary.messaging.settings import MessagingSettings
    from tributary.onboarding.app import create_app
    from tributary.onboarding.settings import Settings

    say("  in process, tracemalloc on")
    for kv in args.env:
        key, _, value = kv.partition("=")
        os.environ[key] = value
    tracemalloc.start(args.frames)
    snapshots: list[tracemalloc.Snapshot] = []
    counts: list[Counter[str]] = []

    def at_mark(_: int) -> None:
        gc.collect()
        counts.append(Counter(type(o).__qualname__ for o in gc.get_objects()))
        snapshots.append(tracemalloc.take_snapshot())

    pid = os.getpid()

    sqlite_memory = sqlite_memory_used()

    def read() -> tuple[dict[str, int], float]:
        kib = status_kib(pid)
        kib.update(threads=threads(pid), sqlite=sqlite_memory() // 1024)
        say(f"      SQLite's own memory (sqlite3_memory_used): {kib['sqlite'] / 1024:.1f} MiB")
        return kib, cpu_seconds(pid)

    async with prefixed(url) as names:
        with tempfile.TemporaryDirectory(prefix="rss-bench-") as tmp:
            settings = Settings.model_validate(
                {
                    "ONBOARDING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/{DB_FILE}",
                    "ONBOARDING_PORT": 0,
                }
            )
            messaging = MessagingSettings(rabbitmq_url=url, name_prefix=names.prefix)
            app = create_app(settings, messaging)
            feeder = Feeder(url, names, args.in_flight, args.version)
            await feeder.open()
            try:
                async with app.router.lifespan_context(app):

                    async def burst() -> bool:
                        if args.reads:
                            transport = httpx.ASGITransport(app=app)
                            await read_burst(
                                "http://onboarding", args.reads, args.read_concurrency, transport
                            )
                        return bool(args.reads)

                    marks = await measure(feeder, checkpoints, read, burst, at_mark)
                    run = Run("in process", marks)
            finally:
                await feeder.close()
    tracemalloc.stop()
    grown = snapshots[-1].compare_to(snapshots[0], "traceback")
    run.notes.append(
        f"tracemalloc, live memory grown from {checkpoints[0]:,} to {checkpoints[-1]:,} events "
        "(top sites):"
    )
    for stat in grown[: args.top]:
        run.notes.append(
            f"- {stat.size_diff / 1024:+.0f} KiB, {stat.count_diff:+,} blocks at "
            + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback[:6])
        )
    types = (counts[-1] - counts[0]).most_common(args.top)
    run.notes.append("")
    run.notes.append("Live objects per type, grown over the same events (gc):")
    run.notes += [f"- {name}: +{n:,}" for name, n in types]
    return run


def git(*args: str) -> None:
    subprocess.run(["git", *args], cwd=ROOT, check=True)


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def table(runs: Sequence[Run], checkpoints: Sequence[int]) -> list[str]:
    head = " | ".join(f"{c:,}" for c in checkpoints)
    lines = [
        f"| code | {head} | VmRSS growth | RssAnon growth | threads | CPU per event |",
        "|---|" + "---|" * (len(checkpoints) + 4),
    ]
    for run in runs:
        cells = " | ".join(mib(m.rss["VmRSS"]) for m in run.marks)
        first, last = run.marks[0], run.marks[-1]
        anon = last.rss["RssAnon"] - first.rss["RssAnon"]
        cpu = (last.cpu - first.cpu) / (last.events - first.events) * 1000
        lines.append(
            f"| {run.label} | {cells} | {run.growth():+.1%} | {anon / 1024:+.1f} MiB "
            f"| {first.rss['threads']} → {last.rss['threads']} | {cpu:.2f} ms |"
        )
    return lines


async def main(args: argparse.Namespace) -> str:
    if args.quick:  # a smoke run: the code path, not figures
        args.checkpoints, args.reads = "300,600", min(args.reads, 20)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    with ExitStack() as infra:
        url = find_rabbitmq(infra).url
        return await measured(args, url, checkpoints)


async def measured(args: argparse.Namespace, url: str, checkpoints: list[int]) -> str:
    command = " ".join(["python", "-m", "bench.rss_bench", *sys.argv[1:]])
    stamp = run_stamp()
    started = time.perf_counter()
    say(command)
    say(stamp)
    runs: list[Run] = []
    if args.in_process:
        runs.append(await run_in_process(url, checkpoints, args))
    else:
        if args.base:
            base = commit_of(args.base)
            with tempfile.TemporaryDirectory(prefix="rss-bench-base-") as tmp:
                tree = Path(tmp) / "base"
                await asyncio.to_thread(git, "worktree", "add", "--detach", "-q", str(tree), base)
                try:
                    runs.append(await run_process(f"`{base}`", url, tree, checkpoints, args))
                finally:
                    await asyncio.to_thread(git, "worktree", "remove", "--force", str(tree))
        runs.append(await run_process("this checkout", url, None, checkpoints, args))
    where = "in this process (tracemalloc on)" if args.in_process else "as a real process"
    lines = [
        "## Onboarding's memory as events accumulate",
        "",
        "Printed by `bench/rss_bench.py` (its docstring says how it measures); nothing here is "
        "typed by hand.",
        "",
        *(["- **`--quick`: a smoke run, not figures to keep**"] if args.quick else []),
        f"- command: `{command}`",
        f"- run: {stamp} before, {load_average()} after; {time.perf_counter() - started:.0f} s",
        f"- versions: {versions(['sqlalchemy', 'aiosqlite', 'aio-pika', 'uvloop'])}",
        f"- the service {where} on a fresh SQLite file, {args.in_flight} `user.created.v"
        f"{args.version}` in flight"
        + (
            f", {args.reads} readiness checks ({args.read_concurrency} at a time, each a "
            "database read through the pool) right after the first column"
            if args.reads
            else ""
        )
        + (f", extra environment {' '.join(args.env)}" if args.env else ""),
        "",
        f"**`VmRSS` (MiB) after the given number of `user.created` events; growth from the "
        f"first column to the last (target: at most {FLAT:.0%})**",
        "",
        *table(runs, checkpoints),
    ]
    for run in runs:
        if run.notes:
            lines += ["", *run.notes]
    return "\n".join(lines)


def cli() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--checkpoints", default="2000,10000,30000,50000")
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument(
        "--reads",
        type=int,
        default=0,
        help="readiness checks (database reads) right after the first checkpoint",
    )
    parser.add_argument("--read-concurrency", type=int, default=16)
    parser.add_argument(
        "--version",
        type=int,
        choices=(1, 2),
        default=1,
        help="user.created version sent (1: what identity publishes; 2: the handler's own)",
    )
    parser.add_argument("--base", help="also run this earlier commit, first (git worktree)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra service env"
    )
    parser.add_argument("--in-process", action="store_true", help="tracemalloc and gc counts")
    parser.add_argument("--frames", type=int, default=8, help="tracemalloc frames kept")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="600 events: a smoke run")
    args = parser.parse_args()
    print_section(uvloop.run(main(args)), args.write, MARKER)


if __name__ == "__main__":
    cli()
