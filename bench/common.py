"""Benchmark helpers: clocks, RSS, percentiles, 1 KB events, pipelined publishing, databases."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aio_pika
from aio_pika.abc import AbstractExchange
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Field, SQLModel

from tributary.contracts.envelope import new_event
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.consumer import OutcomeRecord
from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.publisher import event_message
from tributary.testkit.infra import create_postgres_database, drop_postgres_database

if TYPE_CHECKING:
    from tests.stack import MailSink

DbKind = Literal["sqlite", "postgres"]
DB_LABEL: dict[DbKind, str] = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
ROUTING_KEY = "user.created.v2"


class BenchThing(SQLModel, table=True):
    """The one domain row every benchmark handler writes per event."""

    __tablename__ = "bench_things"

    event_id: str = Field(primary_key=True, max_length=200)
    user_id: str = Field(max_length=64)


# -- measuring -----------------------------------------------------------------------------


class Clock:
    """Counts completions; the rate is taken from the first to the last one (N-1 intervals).

    Also an outcome listener for ``Bus.listeners``: anything but ``processed`` is counted apart.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.unexpected: list[str] = []
        self.done = asyncio.Event()
        self.marks: dict[int, Any] = {}

    def tick(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1
        if self.count >= self.n:
            self.done.set()

    def __call__(self, record: OutcomeRecord) -> None:
        if record.outcome != "processed":
            self.unexpected.append(f"{record.outcome}:{record.reason}")
        self.tick()

    async def wait(self, timeout: float, what: str) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{what}: {self.count} of {self.n} after {timeout:.0f} s") from None

    @property
    def seconds(self) -> float:
        if self.first is None or self.last is None:
            return float("nan")
        return self.last - self.first

    @property
    def measured(self) -> Measured:
        """First to last completion: ``count - 1`` intervals."""
        return Measured(max(self.count - 1, 0), self.seconds)


@dataclass(frozen=True)
class Measured:
    """``count`` messages in ``seconds``; measurements of one contender add up across rounds."""

    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")

    def __add__(self, other: Measured) -> Measured:
        return Measured(self.count + other.count, self.seconds + other.seconds)


@dataclass
class Sample:
    """Units of work done in a window (or several rounds of it): wall seconds and CPU seconds
    of this process (every thread), the broker and the database server."""

    count: int
    seconds: float
    cpu: float
    broker: float = 0.0
    database: float = 0.0
    problems: list[str] = field(default_factory=list)
    rounds: int = 1

    @property
    def rate(self) -> float:
        return Measured(self.count, self.seconds).rate

    @property
    def valid(self) -> bool:
        return not self.problems

    def ms(self, seconds: float) -> float:
        """``seconds`` per unit of work, in milliseconds."""
        return seconds / self.count * 1000 if self.count else float("nan")

    def us(self, seconds: float) -> float:
        """``seconds`` per unit of work, in microseconds."""
        return seconds / self.count * 1e6 if self.count else float("nan")

    def __add__(self, other: Sample) -> Sample:
        return Sample(
            self.count + other.count,
            self.seconds + other.seconds,
            self.cpu + other.cpu,
            self.broker + other.broker,
            self.database + other.database,
            self.problems + other.problems,
            self.rounds + other.rounds,
        )


class Window:
    """Wall time and CPU (this process; the broker and the PostgreSQL server when asked) over
    a window of work."""

    def __init__(self, *, database: bool, broker: bool = True) -> None:
        self.database = database
        self.broker = broker
        # the other processes first: reading /proc is not part of the window
        self.beam = cpu_by_pid("beam.smp") if broker else {}
        self.db = cpu_by_pid("postgres") if database else {}
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def close(self, count: int) -> Sample:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        beam = cpu_between(self.beam, cpu_by_pid("beam.smp")) if self.broker else 0.0
        db = cpu_between(self.db, cpu_by_pid("postgres")) if self.database else 0.0
        return Sample(count, wall, cpu, beam, db)


def database_kinds(value: str) -> list[DbKind]:
    """``--db sqlite,postgres`` as a list; a name not known ends the run with the reason."""
    kinds: list[DbKind] = []
    for name in value.split(","):
        kind = next((k for k in DB_LABEL if k == name), None)
        if kind is None:
            raise SystemExit(f"--db: {name!r} is not one of {', '.join(DB_LABEL)}")
        kinds.append(kind)
    return kinds


def rss_kib() -> int:
    """Resident set size of this process (``VmRSS`` in /proc/self/status), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(p / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


# -- events --------------------------------------------------------------------------------

_ID = "00000000-0000-4000-8000-00000000ffff"
_USER = "usr_" + "Q" * 32


def user_created_payload(user_id: str = _USER) -> UserCreatedV2:
    """A realistic ``user.created.v2`` whose names are long enough for a ~1 KB envelope."""
    return UserCreatedV2(
        user_id=user_id,
        email="augusta.ada.king-noel@analytical-engine.example.co.uk",
        given_name="Augusta Ada Byron " + "A" * 138,
        family_name="King-Noel, Countess of Lovelace " + "L" * 150,
        plan="starter",
        locale="en-GB",
        created_at=datetime(2024, 12, 10, 9, 30, tzinfo=UTC),
    )


def _template() -> bytes:
    event = new_event(
        routing_key=ROUTING_KEY,
        source="/services/identity",
        data=user_created_payload(),
        correlationid=str(uuid.uuid4()),
        causationid=str(uuid.uuid4()),
        event_id=_ID,
    )
    event = event.model_copy(
        update={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    )
    return event.to_bytes()


@dataclass
class Events:
    """``n`` distinct user.created.v2 envelopes (unique id and user id each), ~1 KB.

    Other traffic keeps the same shape: envelopes with their ids, the routing key and
    producer (``app_id``) of their messages, and headers each message carries.
    """

    ids: list[str]
    bodies: list[bytes]
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    routing_key: str = ROUTING_KEY
    app_id: str = "identity"
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, n: int) -> Events:
        template = _template()
        ids: list[str] = []
        bodies: list[bytes] = []
        for _ in range(n):
            event_id = str(uuid.uuid4())
            body = template.replace(_ID.encode(), event_id.encode()).replace(
                _USER.encode(), f"usr_{uuid.uuid4().hex}".encode()
            )
            ids.append(event_id)
            bodies.append(body)
        return cls(ids, bodies)

    def message(self, i: int) -> aio_pika.Message:
        """The message the outbox relay would publish for event ``i``."""
        return event_message(
            self.bodies[i],
            event_id=self.ids[i],
            routing_key=self.routing_key,
            app_id=self.app_id,
            correlation_id=self.ids[i],
            timestamp=self.created,
            headers=dict(self.headers),
        )

    @property
    def size(self) -> int:
        return len(self.bodies[0])


async def publish_pipelined(
    exchange: AbstractExchange,
    routing_key: str,
    events: Events,
    *,
    in_flight: int = 256,
    mandatory: bool = True,
) -> float:
    """Publish every event with up to ``in_flight`` confirms outstanding; returns seconds."""
    limit = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with limit:
            await exchange.publish(events.message(i), routing_key, mandatory=mandatory)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(events.bodies))))
    return time.perf_counter() - start


async def prefill(url: str, queue: str, arguments: dict[str, Any], events: Events) -> None:
    """Declare ``queue`` (durable, ``arguments``) and fill it with ``events`` (confirmed)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments=arguments)
        await publish_pipelined(channel.default_exchange, queue, events)
    finally:
        await connection.close()


async def delete_queues(url: str, queues: Sequence[str], exchanges: Sequence[str] = ()) -> None:
    """Delete what a figure declared; waits up to a minute for a broker that is restarting."""
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = await aio_pika.connect(url)
            break
        except (ConnectionError, aio_pika.exceptions.AMQPConnectionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)
    try:
        for name in queues:
            channel = await connection.channel()
            await channel.queue_delete(name)
        for name in exchanges:
            channel = await connection.channel()
            await channel.exchange_delete(name)
    finally:
        await connection.close()


async def rabbitmq_version(url: str) -> str:
    connection = await aio_pika.connect(url)
    try:
        underlay = connection.transport
        props: dict[str, Any] = underlay.connection.server_properties if underlay else {}
        version = props.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await connection.close()


# -- an SMTP sink in a child process ---------------------------------------------------------


class SinkProcess:
    """``tests.stack.MailSink`` in a child process (``python -m <module> --smtp-child``, whose
    side is :func:`serve_sink`): a real SMTP server is not in the client's process, and here
    it must not share the load generator's GIL. The child prints ``port N`` once, then a line
    per mail it accepts; each of those lines goes to :meth:`on_line`."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    def on_line(self, line: str) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            "--smtp-child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.port = int((await self.process.stdout.readline()).split()[1])
        self._reader = asyncio.create_task(self._read(self.process.stdout))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.on_line(line.decode())

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            await self._reader


def serve_sink(sink: MailSink) -> None:
    """The child's side of :class:`SinkProcess`: start ``sink``, say its port, and serve until
    the parent closes this process's stdin."""
    sink.start()
    print(f"port {sink.port}", flush=True)
    try:
        sys.stdin.read()  # until the parent closes it
    finally:
        sink.stop()


# -- databases -----------------------------------------------------------------------------


@dataclass
class Databases:
    """Makes fresh, empty databases (an SQLite file, or a new PostgreSQL database)."""

    postgres_server: str
    tmp: Path
    created: list[str] = field(default_factory=list)

    @asynccontextmanager
    async def fresh_url(self, kind: DbKind) -> AsyncIterator[str]:
        """The URL of a new, empty database (no tables), removed afterwards."""
        name = f"bench_{uuid.uuid4().hex[:12]}"
        if kind == "sqlite":
            url = f"sqlite+aiosqlite:///{self.tmp / (name + '.db')}"
        else:
            url = await create_postgres_database(self.postgres_server, name)
        try:
            yield url
        finally:
            if kind == "postgres":
                await drop_postgres_database(self.postgres_server, name)
            else:
                for suffix in ("", "-wal", "-shm"):
                    (self.tmp / f"{name}.db{suffix}").unlink(missing_ok=True)

    @asynccontextmanager
    async def fresh(self, kind: DbKind) -> AsyncIterator[AsyncEngine]:
        """A new database with the runtime's tables and ``bench_things``."""
        async with self.fresh_url(kind) as url:
            engine = create_engine(url)
            try:
                await create_runtime_tables(engine)
                async with engine.begin() as conn:
                    await conn.run_sync(
                        lambda c: SQLModel.metadata.create_all(
                            c, tables=[SQLModel.metadata.tables["bench_things"]]
                        )
                    )
                yield engine
            finally:
                await engine.dispose()


@asynccontextmanager
async def databases(postgres_server: str) -> AsyncIterator[Databases]:
    with tempfile.TemporaryDirectory(prefix="tributary-bench-") as tmp:
        yield Databases(postgres_server, Path(tmp))


async def count_rows(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar_one())


async def postgres_version(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return str((await conn.execute(text("SHOW server_version"))).scalar_one())


# -- other processes' CPU ------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (all its threads) so far; 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pids_named(comm: str) -> list[int]:
    """The processes whose command name is ``comm`` (``beam.smp``: RabbitMQ; ``postgres``)."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
    return pids


def cpu_by_pid(comm: str) -> dict[int, float]:
    """CPU so far of each process named ``comm``: two readings give a window's CPU
    (:func:`cpu_between`), processes started in between included."""
    return {pid: cpu_seconds(pid) for pid in pids_named(comm)}


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the processes of ``after`` spent since ``before`` (new ones from zero;
    ones that ended in between are not counted)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


# -- stamps and results files ------------------------------------------------------------------


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``,
    replacing what was there; without those markers, the section (markers included) is
    appended. Everything outside the markers is left as it was."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    first, last = old.find(start), old.find(end)
    if first >= 0 and last > first:
        new = old[:first] + block + old[last + len(end) :]
    elif first >= 0 or last >= 0:
        raise ValueError(f"{path}: the markers of {name!r} are not a start and then an end")
    else:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)


def package_version(dist: str) -> str:
    """The installed version of ``dist``, or "absent" (for the stamp of a results table)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def run_stamp() -> str:
    """Commit, UTC time and load average: which code made the figures, and how busy it was."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # the results file itself is written by the run: not a change of the code measured
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(exclude)bench/RESULTS.md"],
            capture_output=True,
            text=True,
        )
        if dirty.stdout.strip():
            commit += " (with uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"commit {commit}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {load}"
