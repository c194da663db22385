"""Outages and broker faults against consumers running as real processes (issue 12, §2, §4, §5).

The consumer under test is the onboarding service, run as ``python -m tributary.onboarding``
(for the restart test, forked by ``fork_server.py`` after the imports) and judged over HTTP by
its ``GET /health/ready``: it consumes ``user.created`` and publishes ``workspace.created``
through its outbox, so it both consumes and publishes.
The handler-timeout test uses ``fault_worker.py``. Faults only hit servers a test owns: a
private PostgreSQL, the service's own SQLite file, a private RabbitMQ node (memory alarm,
closed connections); on the shared broker a test only uses queues under its own prefix.

Every test ends by counting what the service's database committed (one workspace and one
inbox row per sign-up), what it published (one ``workspace.created`` each) and what the broker
still holds (DLQ, retry tiers, work queue: empty).

Slow, and meant to run one test at a time (as pytest does by default): five to six minutes in
all, three of them the PostgreSQL outage that §2 asks for (the others take 10-40 s each). The
whole module is marked ``slow`` (mostly waiting): ``make test`` runs it in a second pytest
process beside the rest of the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel, col, func, select

from tributary.messaging.db import InboxRow, OutboxRow, create_engine
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import delete_prefixed, queue_depth, read_queue
from tributary.messaging.topology import Names, QueueSet, declare_exchanges
from tributary.onboarding.models import Workspace
from tributary.testkit.nodes import PostgresNode, RabbitNode
from tributary.testkit.processes import ServiceProcess, free_port, service_env
from tributary.testkit.waiting import eventually

from .fault_worker import HANG_MARKER, FaultThing, create_tables
from .helpers import publish_events, user_created
from .test_faults import Worker

# slow: mostly waiting on held outages, so `make test` runs them in its background lane
pytestmark = [pytest.mark.broker, pytest.mark.slow]

SERVICE = "onboarding"
FORK_SERVER = Path(__file__).with_name("fork_server.py")
FAULT_WORKER = Path(__file__).with_name("fault_worker.py")
DEFAULT_TIERS: tuple[float, ...] = MessagingSettings.model_fields["retry_tiers"].default
PG_OUTAGE_SECONDS = 180.0
SQLITE_OUTAGE_SECONDS = 20.0
SQLITE_TIERS = (0.5, 1.0, 2.0)
NOT_READY_WITHIN = 30.0
"""Longest wait for readiness to notice an outage (the consumer learns of it on its next try)."""


def new_user_id() -> str:
    return f"usr_{uuid.uuid4().hex[:16]}"


# -- the service as a process ----------------------------------------------------------------


class ForkedChild:
    """What :class:`ServiceProcess` uses of a ``Popen``, for a child of the fork server."""

    def __init__(self, pid: int, exit_file: Path) -> None:
        self.pid = pid
        self.exit_file = exit_file
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.exit_file.exists():
            with contextlib.suppress(ValueError):  # being written
                self.returncode = int(self.exit_file.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet: the pid is still this child's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """``fork_server.py``: processes of one service without a cold interpreter's imports."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def open(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(FORK_SERVER), self.name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    def fork(self, env: dict[str, str], log: Path) -> ForkedChild:
        assert self.process is not None
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        exit_file = log.with_name(f"{log.name}.exit")
        exit_file.unlink(missing_ok=True)
        self.process.stdin.write(json.dumps({"env": env, "log": str(log)}).encode() + b"\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer.strip().isdigit(), f"fork server: {answer!r}\n{self.log.read_text()}"
        return ForkedChild(int(answer), exit_file)

    def close(self) -> None:
        """End of input ends the server; its children die with it."""
        if self.process is not None:
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    pipe.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@dataclass
class ForkedService(ServiceProcess):
    """A :class:`ServiceProcess` started by a :class:`ForkServer` instead of a fresh exec."""

    server: ForkServer | None = None

    def start(self) -> None:
        assert self.server is not None
        self.process = self.server.fork(self.env, self.log_path)  # type: ignore[assignment]


@dataclass
class Onboarding:
    """The onboarding service under test: its processes, what it was fed, what it did."""

    broker_url: str
    database_url: str
    workdir: Path
    names: Names
    tiers: tuple[float, ...]
    settings: dict[str, str]
    engine: AsyncEngine
    """The test's own connections to the service's database (no pool: it outlives outages)."""
    server: ForkServer | None = None
    """Where processes come from if not from a fresh interpreter each."""
    users: list[str] = field(default_factory=list)
    processes: list[ServiceProcess] = field(default_factory=list)
    current: ServiceProcess | None = None

    @property
    def queues(self) -> QueueSet:
        return self.names.service_queues(SERVICE, len(self.tiers))

    @property
    def sink(self) -> str:
        """A queue bound to ``workspace.created``: what the service published."""
        return f"{self.names.prefix}tests.workspace-created"

    def prepare(self) -> ServiceProcess:
        """A new service process on its own port, not yet running."""
        port = free_port()
        values = {
            "RABBITMQ_URL": self.broker_url,
            "TRIBUTARY_NAME_PREFIX": self.names.prefix,
            "TRIBUTARY_RETRY_TIERS": json.dumps(list(self.tiers)),
            "ONBOARDING_DATABASE_URL": self.database_url,
            "ONBOARDING_PORT": str(port),
            "OTEL_SDK_DISABLED": "true",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **self.settings,
        }
        log = self.workdir / f"{SERVICE}-{len(self.processes)}.log"
        env = service_env(values)
        process = (
            ServiceProcess(SERVICE, port, env, log)
            if self.server is None
            else ForkedService(SERVICE, port, env, log, server=self.server)
        )
        self.processes.append(process)
        return process

    async def start(self, process: ServiceProcess | None = None) -> ServiceProcess:
        """Run ``process`` (or a new one) and wait until it says it is ready."""
        process = process or self.prepare()
        process.start()
        self.current = process
        await asyncio.to_thread(process.wait_ready, 120.0)
        return process

    # -- input -------------------------------------------------------------------------------

    async def feed(self, n: int) -> None:
        """Publish ``n`` new sign-ups as identity's relay would (persistent, confirmed).

        A connection the broker drops is opened again and the chunk published again: the
        copies are what a relay's ambiguous publishes produce, and the inbox absorbs them.
        """
        events = [user_created(user_id=new_user_id()) for _ in range(n)]
        self.users += [e["data"]["user_id"] for e in events]
        errors: list[str] = []

        async def published() -> bool:
            try:
                await publish_events(self.broker_url, self.names, events)
            except Exception as exc:  # the broker closed the connection under us
                errors.append(type(exc).__name__)
                return False
            return True

        await eventually(published, timeout=120, poll=0.5, what=f"{n} events published")

    # -- what the service says and did -----------------------------------------------------

    async def readiness(self) -> tuple[int, str]:
        """Status and body of ``GET /health/ready`` (status 0: no answer at all)."""
        assert self.current is not None
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(f"{self.current.url}/health/ready")
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        return response.status_code, response.text

    async def count(self, table: type[SQLModel]) -> int:
        async with self.engine.connect() as conn:
            result = await conn.execute(select(func.count()).select_from(table))
            return int(result.scalar_one())

    async def handled(self) -> int:
        return await self.count(Workspace)

    async def depth(self, queue: str) -> int:
        return await queue_depth(self.broker_url, queue)

    def log_text(self) -> str:
        return "\n".join(p.log_text() for p in self.processes)

    def log_records(self) -> list[dict[str, Any]]:
        """The service's structured (JSON) log records."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                if isinstance(record := json.loads(line), dict):
                    records.append(record)
        return records

    def log_excerpt(self, lines: int = 25) -> str:
        """Warnings and errors of every process, then the last lines of the current one."""
        noisy = [
            line
            for line in self.log_text().splitlines()
            if '"level": "warning"' in line or '"level": "error"' in line or "Traceback" in line
        ]
        tail = self.current.tail(lines) if self.current is not None else ""
        return "\n".join(
            ["service warnings/errors (last):", *noisy[-lines:], "service log (tail):", tail]
        )

    async def wait(
        self, check: Callable[[], Awaitable[bool]], *, what: str, timeout: float = 60.0
    ) -> None:
        """``eventually``, failing with the service's log (and early if the process died)."""

        async def done() -> bool:
            process = self.current.process if self.current is not None else None
            assert process is None or process.poll() is None, (
                f"the service exited ({process.returncode}) while waiting for {what}\n"
                f"{self.log_excerpt()}"
            )
            return await check()

        try:
            await eventually(done, timeout=timeout, what=what, poll=0.2)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.log_excerpt()}") from None

    async def wait_handled(self, n: int, *, timeout: float = 120.0) -> None:
        async def enough() -> bool:
            return await self.handled() >= n

        await self.wait(enough, what=f"{n} workspaces", timeout=timeout)

    async def wait_readiness(self, status: int, *, timeout: float = 60.0) -> str:
        """Wait until readiness answers ``status``; returns the body."""
        last: list[str] = [""]

        async def answers() -> bool:
            code, last[0] = await self.readiness()
            return code == status

        await self.wait(answers, what=f"readiness {status}", timeout=timeout)
        return last[0]

    # -- the verdict -------------------------------------------------------------------------

    async def report(self, fault: str) -> None:
        """What the current process counted (shown with ``-s``; the figures for the README)."""
        assert self.current is not None
        print(f"{fault}: {len(self.users)} sign-ups, outcomes {await outcomes(self.current.url)}")

    async def assert_each_handled_once(self) -> None:
        """One workspace and one inbox row per sign-up, each published once at least; no dead
        letter, nothing left in a retry tier or the work queue."""
        async with self.engine.connect() as conn:
            owners = list((await conn.execute(select(col(Workspace.owner_id)))).scalars())
        assert len(owners) == len(set(owners)) == len(self.users)
        assert set(owners) == set(self.users)
        assert await self.count(InboxRow) == len(self.users)
        assert await self.count(OutboxRow) == len(self.users)

        async def all_published() -> bool:
            async with self.engine.connect() as conn:
                pending = select(func.count()).where(col(OutboxRow.published_at).is_(None))
                return int((await conn.execute(pending)).scalar_one()) == 0

        await self.wait(all_published, what="the outbox published", timeout=60)
        async with self.engine.connect() as conn:
            produced = set((await conn.execute(select(col(OutboxRow.event_id)))).scalars())
        sent = await message_ids(self.broker_url, self.sink)
        assert set(sent) == produced, f"{len(produced - set(sent))} workspace.created missing"

        qs = self.queues
        assert await self.depth(qs.dlq) == 0, self.log_excerpt()
        assert [await self.depth(q) for q in qs.retries] == [0] * len(qs.retries)
        assert await self.depth(qs.work) == 0
        log = self.log_text()
        assert "dead_lettered" not in log, self.log_excerpt()
        assert "retries_exhausted" not in log, self.log_excerpt()


async def message_ids(url: str, queue: str) -> list[str]:
    """The message ids of everything in ``queue`` (taken off it, many at a time)."""
    ids: list[str] = []
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        total = int(declared.declaration_result.message_count or 0)
        if total:
            async with declared.iterator(no_ack=True) as messages:
                async for message in messages:
                    ids.append(str(message.message_id))
                    if len(ids) == total:
                        break
    finally:
        await connection.close()
    return ids


@asynccontextmanager
async def onboarding(
    broker_url: str,
    database_url: str,
    workdir: Path,
    *,
    shared_broker: bool,
    forked: bool = False,
    tiers: tuple[float, ...] = DEFAULT_TIERS,
    **settings: str,
) -> AsyncIterator[Onboarding]:
    """The service's topology and a sink for its events; processes killed, queues deleted after.

    On the shared broker every name gets a fresh prefix; a private node keeps the real names.
    ``forked``: processes come from a :class:`ForkServer` (for tests that start many).
    """
    names = Names(f"o{uuid.uuid4().hex[:10]}." if shared_broker else "")
    server = ForkServer(SERVICE, workdir / "fork-server.log") if forked else None
    service = Onboarding(
        broker_url,
        database_url,
        workdir,
        names,
        tiers,
        dict(settings),
        create_engine(database_url, poolclass=NullPool),
        server,
    )
    if server is not None:
        server.open()
    connection = await aio_pika.connect(broker_url)
    try:
        await declare_exchanges(connection, names)
        channel = await connection.channel()
        sink = await channel.declare_queue(service.sink, durable=True)
        exchange = await channel.get_exchange(names.exchange)
        await sink.bind(exchange, "workspace.created.*")
    finally:
        await connection.close()
    try:
        yield service
    finally:
        for process in service.processes:
            process.kill()
        if server is not None:
            server.close()
        await service.engine.dispose()
        if shared_broker:
            qs = service.queues
            await delete_prefixed(broker_url, names, [qs.work, qs.dlq, *qs.retries, service.sink])


# -- holding an outage -----------------------------------------------------------------------


@dataclass
class Watch:
    """Readiness while a fault lasted: (seconds into it, HTTP status, body)."""

    seen: list[tuple[float, int, str]] = field(default_factory=list)
    resumed: int = 0
    """Times the consumer logged that it resumed before the fault was lifted."""

    def summary(self) -> str:
        statuses = [status for _, status, _ in self.seen]
        first = next((t for t, status, _ in self.seen if status == 503), None)
        said = sorted({r for _, _, body in self.seen for r in reasons(body)})
        return (
            f"{len(statuses)} probes, first 503 at {first} s, statuses {sorted(set(statuses))}, "
            f"resumed {self.resumed} times, reasons {said}"
        )

    def assert_not_ready_throughout(self, *, naming: str) -> None:
        """503 within :data:`NOT_READY_WITHIN`, then 503 until the end, with a reason naming
        ``naming``."""
        not_ready = [(t, body) for t, status, body in self.seen if status == 503]
        assert not_ready, f"readiness never said 503 during the outage: {self.seen[:3]}"
        first = not_ready[0][0]
        assert first <= NOT_READY_WITHIN, f"readiness noticed the outage only after {first} s"
        ready = [(t, status) for t, status, _ in self.seen if t >= first and status != 503]
        assert not ready, f"readiness not 503 during the outage at (s, status): {ready[:5]}"
        assert any(naming in reason for _, body in not_ready for reason in reasons(body)), (
            f"no reason naming the {naming}: {not_ready[-1][1]}"
        )
        # readiness is sampled; a consumer that resumes and pauses again between two samples
        # shows only in its log
        assert self.resumed == 0, f"consumption resumed {self.resumed} times during the outage"


def reasons(body: str) -> list[str]:
    """The ``reasons`` of a readiness body as ``"check: reason"`` lines, lower-cased."""
    try:
        found = json.loads(body).get("reasons") or {}
    except (ValueError, AttributeError):
        return [body.lower()]
    return [f"{check}: {reason}".lower() for check, reason in found.items()]


async def hold_outage(
    service: Onboarding, seconds: float, bursts: Sequence[tuple[float, int]]
) -> Watch:
    """Keep a fault on for ``seconds``: sign-ups arrive in ``bursts`` ((second, count)),
    readiness is probed four times a second (a consumer that resumes too early is ready for
    a moment only), and a dead letter fails the test at once."""
    watch = Watch()
    schedule = sorted(bursts)
    began = time.monotonic()
    last_dlq_check = -5.0
    while (elapsed := time.monotonic() - began) < seconds:
        while schedule and schedule[0][0] <= elapsed:
            await service.feed(schedule.pop(0)[1])
        status, body = await service.readiness()
        watch.seen.append((round(elapsed, 1), status, body))
        if elapsed - last_dlq_check >= 5:
            last_dlq_check = elapsed
            dead = await service.depth(service.queues.dlq)
            assert dead == 0, (
                f"{dead} events dead-lettered {elapsed:.0f} s into the outage\n"
                f"{service.log_excerpt()}"
            )
        assert service.current is not None
        assert service.current.process is not None
        assert service.current.process.poll() is None, f"service died\n{service.log_excerpt()}"
        # the fault's duration is the point of the test: this paces the probes, waits for nothing
        await asyncio.sleep(0.25)
    watch.resumed = sum(1 for r in service.log_records() if r.get("outcome") == "resumed")
    return watch


# -- §2: an outage is not a message failure --------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(600)
async def test_postgres_down_3_minutes_with_default_tiers_pauses_and_dead_letters_nothing(
    postgres_node: PostgresNode, broker_url: str, tmp_path: Path
) -> None:
    database_url = await postgres_node.create_database("onboarding")
    async with onboarding(broker_url, database_url, tmp_path, shared_broker=True) as service:
        await service.start()
        await service.feed(10)
        await service.wait_handled(10)

        await asyncio.to_thread(postgres_node.stop)
        try:
            # 500 sign-ups in the first 80 s: even the last burst waits 100 s, longer than the
            # default tiers add up to (1 + 10 + 60 s). The first burst is small: a consumer
            # that fails every event in turn (3 in-process attempts each) needs ~0.2 s per
            # event and pass, so 20 events are through all tiers and into the DLQ within
            # ~80 s, while a burst of 100 would still be crawling through them after 3 minutes.
            bursts = [(0.0, 20), *((t, 120) for t in (20.0, 40.0, 60.0, 80.0))]
            watch = await hold_outage(service, PG_OUTAGE_SECONDS, bursts)
        finally:
            await asyncio.to_thread(postgres_node.start)
        back = time.monotonic()
        print(f"postgres outage: {watch.summary()}")
        watch.assert_not_ready_throughout(naming="database")

        await service.wait_handled(510, timeout=180)
        await service.wait_readiness(200)
        print(f"postgres outage: all handled and ready {time.monotonic() - back:.1f} s after")
        await service.assert_each_handled_once()
        await service.report("postgres outage")


class Unwritable:
    """The directory holding an SQLite database, and its files, made unwritable under a
    running service, root or not, open descriptors or not.

    Measured here (root, ext4): ``chmod`` stops neither root nor a descriptor already open
    for writing; ``mount -o remount,ro`` (a tmpfs, or a bind mount of the directory) fails
    with EBUSY while any file on it is open for writing; a competing ``BEGIN EXCLUSIVE`` is a
    busy lock (``database is locked`` after the 30 s busy timeout), not an unwritable file;
    a full disk needs its own filesystem and starts failing only once the WAL, which SQLite
    reuses, has to grow. The immutable attribute (``chattr +i``) is enforced on every write,
    even through descriptors opened before it was set, and binds root too: a connection
    already open gets ``disk I/O error`` (SQLITE_IOERR_WRITE), a new one ``attempt to write
    a readonly database``, reads keep working, and the same connections write again once it
    is cleared. That is what a filesystem turning read-only under a process looks like.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.on_since: float | None = None

    @staticmethod
    def supported(directory: Path) -> str | None:
        """Why ``chattr +i`` cannot be used in ``directory``, or None if it can."""
        if shutil.which("chattr") is None:
            return "no chattr (e2fsprogs) installed"
        probe = directory / ".immutable-probe"
        probe.write_text("")
        try:
            done = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
            if done.returncode != 0:
                return f"chattr +i refused here: {done.stderr.strip()}"
            subprocess.run(["chattr", "-i", str(probe)], check=True)
            return None
        finally:
            probe.unlink()

    def _chattr(self, flag: str) -> None:
        paths = [self.directory, *sorted(self.directory.iterdir())]
        subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)

    def on(self) -> None:
        self._chattr("+i")

    def off(self) -> None:
        self._chattr("-i")


@pytest.mark.timeout(300)
async def test_sqlite_file_unwritable_pauses_consumption_and_dead_letters_nothing(
    broker_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "db"
    directory.mkdir()
    if (why := Unwritable.supported(directory)) is not None:
        pytest.skip(f"SKIPPED LOUDLY: cannot make a file unwritable for root here: {why}")
    fault = Unwritable(directory)
    # The tiers are shortened (0.5 + 1 + 2 s) and the outage with them (20 s, over five times
    # their sum): the claim, "an outage longer than the tiers dead-letters nothing", is the
    # same as with the defaults; the 3-minute version with the default tiers is the PostgreSQL
    # test above. The probe back-off is shortened to match.
    async with onboarding(
        broker_url,
        f"sqlite+aiosqlite:///{directory / 'onboarding.db'}",
        tmp_path,
        shared_broker=True,
        tiers=SQLITE_TIERS,
        TRIBUTARY_PAUSE_PROBE_MAX_SECONDS="1",
    ) as service:
        await service.start()
        await service.feed(10)
        await service.wait_handled(10)

        fault.on()
        try:
            # as above: with 10 events alone, a consumer failing them in turn has them through
            # the tiers and in the DLQ within ~10 s; the rest then waits 10 s, 3x the tiers
            bursts = [(0.0, 10), (10.0, 490)]
            watch = await hold_outage(service, SQLITE_OUTAGE_SECONDS, bursts)
        finally:
            fault.off()
        back = time.monotonic()
        print(f"sqlite unwritable: {watch.summary()}")
        watch.assert_not_ready_throughout(naming="database")

        await service.wait_handled(510, timeout=120)
        await service.wait_readiness(200)
        print(f"sqlite unwritable: all handled and ready {time.monotonic() - back:.1f} s after")
        await service.assert_each_handled_once()
        await service.report("sqlite unwritable")


# -- §4: broker flow control and lost consumers ----------------------------------------------


@pytest.mark.timeout(300)
async def test_a_memory_alarm_blocks_publishing_not_consuming_and_recovers_without_restart(
    rabbit_node: RabbitNode, tmp_path: Path
) -> None:
    backlog, late = 4_000, 1_000
    async with onboarding(
        rabbit_node.url,
        f"sqlite+aiosqlite:///{tmp_path / 'onboarding.db'}",
        tmp_path,
        shared_broker=False,
        # a blocked publish counts as a broker failure after 2 s instead of 15
        TRIBUTARY_PUBLISH_TIMEOUT_SECONDS="2",
    ) as service:
        process = await service.start()
        await service.feed(backlog)
        await service.wait_handled(100)

        # a tiny watermark raises the alarm at once: the broker blocks every connection that
        # publishes (the service's relay, and this test's own publisher too)
        await asyncio.to_thread(rabbit_node.set_memory_watermark, 0.000001)
        stream: asyncio.Task[None] | None = None
        try:
            assert await service.handled() < backlog, "the backlog was gone before the alarm"
            stream = asyncio.create_task(service.feed(late))
            blocked = await service.wait_readiness(503, timeout=60)
            print(f"memory alarm: readiness 503 with {reasons(blocked)}")
            assert any("broker" in reason for reason in reasons(blocked)), blocked
            # consumption goes on over its own connection: the whole backlog is handled
            await service.wait_handled(backlog, timeout=120)
            status, body = await service.readiness()
            assert status == 503, f"ready while the broker still blocks publishing: {body}"
            published = await service.depth(service.sink)
            assert published < backlog, "the relay published through a memory alarm?"
            assert not stream.done(), "a publish went through during the alarm?"
            print(f"memory alarm: {backlog} handled during it, {published} published before it")
        finally:
            await asyncio.to_thread(rabbit_node.reset_memory_watermark)
            if stream is not None and not stream.done():
                await asyncio.wait_for(stream, 120)
        back = time.monotonic()

        await service.wait_readiness(200)
        print(f"memory alarm: ready {time.monotonic() - back:.1f} s after the reset")
        await service.wait_handled(backlog + late)
        assert service.processes == [process]
        assert process.process is not None
        assert process.process.poll() is None, "the service restarted"
        await service.assert_each_handled_once()
        await service.report("memory alarm")


@pytest.mark.timeout(420)
async def test_all_connections_closed_10_times_during_2000_events_consumers_come_back(
    rabbit_node: RabbitNode, tmp_path: Path
) -> None:
    rounds, chunk = 10, 200
    database = tmp_path / "onboarding.db"
    async with onboarding(
        rabbit_node.url,
        f"sqlite+aiosqlite:///{database}",
        tmp_path,
        shared_broker=False,
        # aio-pika's reconnect interval (a URL option) down from 5 s: ten rounds, not minutes
        RABBITMQ_URL=f"{rabbit_node.url}?reconnect_interval=1",
    ) as service:
        await service.start()

        async def deliveries_in_hand() -> bool:
            queues = await asyncio.to_thread(rabbit_node.queues)
            return queues[service.queues.work]["messages_unacknowledged"] > 0

        for n in range(rounds):
            # Every close lands on a batch in flight: the write lock holds the consumer's
            # transaction open (it waits on SQLite's busy timeout) until the connections are
            # gone, so its commit comes after the close and its acks go to a dead channel.
            with sqlite_write_lock(database):
                await service.feed(chunk)
                await service.wait(deliveries_in_hand, what="deliveries in hand")
                await asyncio.to_thread(rabbit_node.close_all_connections)
            await service.wait_handled((n + 1) * chunk)

        async def one_consumer_on_every_work_queue() -> bool:
            queues = await asyncio.to_thread(rabbit_node.queues)
            work = {name: q["consumers"] for name, q in queues.items() if name.endswith(".events")}
            return work == {service.queues.work: 1}

        await service.wait(one_consumer_on_every_work_queue, what="1 consumer per work queue")
        await service.wait_readiness(200)
        await service.assert_each_handled_once()
        await service.report(f"close_all_connections x{rounds}")


@pytest.mark.timeout(600)
async def test_a_hanging_handler_times_out_through_the_tiers_into_the_dlq(
    broker_url: str, tmp_path: Path
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'worker.db'}"
    engine = create_engine(database_url, poolclass=NullPool)
    await create_tables(engine)
    names = Names(f"h{uuid.uuid4().hex[:10]}.")
    hang = user_created(user_id=f"{HANG_MARKER}{uuid.uuid4().hex[:8]}")
    good = [user_created(user_id=new_user_id()) for _ in range(20)]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FAULT_WORKER),
        *("--db", database_url, "--broker", broker_url, "--prefix", names.prefix),
        *("--service", "hanging", "--mode", "hang"),
        *("--handler-timeout", "1", "--inprocess-retries", "1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    worker = Worker(process)
    qs = names.service_queues("hanging", 2)  # isolated_settings: tiers of 0.2 and 0.5 s
    try:
        await worker.wait_ready()
        await publish_events(broker_url, names, [*good[:10], hang, *good[10:]])

        async def neighbours_handled() -> bool:
            async with engine.connect() as conn:
                n = (await conn.execute(select(func.count()).select_from(FaultThing))).scalar()
            return n == len(good)

        await eventually(neighbours_handled, timeout=60, what="the 20 neighbours")

        async def dead_lettered() -> bool:
            return await queue_depth(broker_url, qs.dlq) == 1

        try:
            await eventually(dead_lettered, timeout=60, what="the hanging event in the DLQ")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{worker.output()}") from None
        [dead] = await read_queue(broker_url, qs.dlq)
        assert dead.message_id == hang["id"]
        assert dead.reason == "retries_exhausted", dead.headers
        why = f"{dead.headers.get('x-tributary-exception')} {dead.headers.get('x-tributary-error')}"
        assert "HandlerTimeout" in why, dead.headers
        assert dead.headers.get("x-tributary-retries") == 2, dead.headers
        assert [await queue_depth(broker_url, q) for q in (*qs.retries, qs.work)] == [0, 0, 0]
        assert await worker.terminate() == 0, worker.output()
    finally:
        await worker.kill()
        await engine.dispose()
        await delete_prefixed(broker_url, names, [qs.work, qs.dlq, *qs.retries])


# -- §5: stops and restarts never charge healthy messages ------------------------------------


@pytest.mark.timeout(600)
async def test_20_sigterm_restarts_during_5000_events_with_delivery_limit_5_lose_nothing(
    broker_url: str, tmp_path: Path
) -> None:
    total, restarts, prefetch, top_up = 5_000, 20, 100, 1_000
    async with onboarding(
        broker_url,
        f"sqlite+aiosqlite:///{tmp_path / 'onboarding.db'}",
        tmp_path,
        shared_broker=True,
        forked=True,
        TRIBUTARY_DELIVERY_LIMIT="5",
        # A graceful stop finishes what the consumer holds, so every restart uses up to a
        # prefetch of the stream: with the default 256, 20 restarts would drain 5,000 events
        # before the last one. 100 keeps every stop inside the stream.
        TRIBUTARY_PREFETCH=str(prefetch),
    ) as service:
        current = await service.start()
        await service.feed(total)
        stopping: list[tuple[ServiceProcess, asyncio.Task[int | None]]] = []
        waiting_at_stop: list[int] = []
        for _ in range(restarts):
            # Every stop must land inside the stream. How far a process gets between its start
            # and its stop depends on the machine's speed, so the stream is topped up whenever
            # fewer than a few prefetches are left: more events, never a drained queue.
            if len(service.users) - await service.handled() < 4 * prefetch:
                await service.feed(top_up)
            # at work (a prefetch in hand, hundreds waiting): the harshest moment to stop
            working = functools.partial(processed_by, current)
            await service.wait(working, what="the new process at work")
            # the replacement starts as soon as the old process is told to stop; the old one
            # finishes what it holds meanwhile
            stopping.append((current, asyncio.create_task(asyncio.to_thread(current.stop, 60.0))))
            waiting_at_stop.append(len(service.users) - await service.handled())
            current = await service.start()
        for process, stopped in stopping:
            code, shutdown = await stopped, process.log_text()
            # uvicorn re-raises the SIGTERM it handled once the app has shut down
            assert code in (0, -signal.SIGTERM), f"exit {code}\n{shutdown[-3000:]}"
            assert "Application shutdown complete" in shutdown, shutdown[-3000:]
        print(f"SIGTERM restarts: events not yet handled at each stop {waiting_at_stop}")
        assert min(waiting_at_stop) > prefetch, "a restart came too late in the stream"

        fed = len(service.users)
        print(f"{fed} events fed ({total} at first, topped up by {top_up} when running low)")
        await service.wait_handled(fed, timeout=180)
        await service.assert_each_handled_once()


@contextmanager
def sqlite_write_lock(database: Path) -> Iterator[None]:
    """Hold SQLite's write lock on ``database`` (as a backup or a migration would)."""
    connection = sqlite3.connect(database, isolation_level=None, timeout=30)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


async def processed_by(process: ServiceProcess) -> bool:
    """Whether ``process`` has handled an event since it started (its own metrics)."""
    return (await outcomes(process.url)).get("processed", 0) > 0


async def outcomes(url: str) -> dict[str, float]:
    """Deliveries by outcome, as the service's ``/metrics`` counts them since it started."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "tributary_events_consumed":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels["outcome"]
                    counts[outcome] = counts.get(outcome, 0) + sample.value
    return counts
