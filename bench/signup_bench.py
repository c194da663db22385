"""Sign-up flow benchmark: identity, onboarding, email and audit as real local processes.

    uv run python -m bench.signup_bench [--quick | -n N] [--only 1,2,...] [--write FILE]
    uv run python -m bench.signup_bench --profile [--quick | -n N]
    uv run --with py-spy python -m bench.signup_bench --py-spy [--quick]

Each service runs as ``python -m tributary.<name>`` (``tests.stack.Stack``) on a fresh SQLite
file, against the local RabbitMQ under a unique name prefix, mailing a real SMTP sink
(``tests.stack.MailSink``, aiosmtpd, in a child process). Prints figures and ratios; asserts
nothing. The load generator, the sink, the broker and the four services share one machine:
every rate is printed with the CPU each process spent per sign-up and the mean time each
consumer spent in its handler, which is where a bottleneck shows.

A sign-up is *fully processed* when its workspace exists, its welcome email has reached the
sink and audit has recorded both user.created and workspace.created under its correlation id
(one ``X-Correlation-ID`` per sign-up). While waiting, only cheap signals are polled (the
sink's count, audit's ``tributary_events_consumed_total{outcome="processed"}``); completion
times are then taken from what was committed (audit ``recorded_at``) and from the sink's clock,
so they do not depend on the polling interval.

Figures (full run; ``--quick`` in brackets):
  1  raw broker: aio-pika pipelined confirmed publish + consume/ack of 1 KB persistent
     messages through one quorum queue, 10,000 [5,000] messages
  2  throughput: 2,000 [300] sign-ups after a warm-up of 100 [30], 32 POSTs in flight, from
     the first POST to the last completion
  3  latency at half the capacity figure 2 measured (``--rate`` to choose), for 20 s [8 s]:
     201 response -> last consumer commit (the latest
     of the workspace's created_at, the email's sent_at, the two audit entries' recorded_at)
  4  RSS of each service after 2,100 [330] and 10,000 [1,500] sign-ups (the stack of 2 and 3;
     also after figure 3 and after each quarter of the rest, to tell a step from a slope)
  5  tracing cost: figure 2 on three fresh stacks, tracing off / 10 % parent-based / always
     on, exporting OTLP/HTTP to a real receiver (a child process, not this load generator).
     The three stacks run side by side (idle but for the one measured) and are measured in
     interleaved rounds, so drifting load from other tenants hits all three alike

The section (stamp, versions, settings, the results table with every process's CPU per
sign-up beside each rate, and each figure's details) is printed at the end; ``--write FILE``
puts it between its markers (signup-bench) in FILE. The load generator runs on uvloop, as the
services do.

``--profile``: one throughput run with every service started under the standard library's
cProfile (``bench.profiled``: every thread, each thread's CPU time) and profiled over the
measured sign-ups only; prints the section "where the CPU goes": each service's own CPU time
by library, and its costliest functions. Profiling slows the services several-fold, so it
is a run of its own. ``--py-spy``: the same run with ``py-spy record`` attached instead (not a
dependency: ``uv run --with py-spy``). ``--in-flight``, ``--rate`` and ``--env`` are for
experiments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.common import (
    Clock,
    Events,
    Sample,
    SinkProcess,
    cpu_seconds,
    percentile,
    pids_named,
    rabbitmq_version,
    serve_sink,
)
from bench.report import (
    Meter,
    Row,
    Section,
    bench_parser,
    cpu_cell,
    print_section,
    results_table,
    sqlite_version,
    table,
    versions,
)
from tests.stack import SIGNUP_SERVICES, MailSink, Stack, queue_names
from tributary.messaging.testing import delete_prefixed
from tributary.messaging.topology import QUORUM, Names
from tributary.testkit.infra import find_rabbitmq
from tributary.testkit.otlp import OtlpReceiver
from tributary.testkit.processes import ServiceProcess, free_port, module_of
from tributary.testkit.waiting import eventually

USER_CREATED = "com.tributary.user.created.v1"
WORKSPACE_CREATED = "com.tributary.workspace.created.v1"
EMAIL_SENT = "com.tributary.email.sent.v1"
AUDITED_PER_SIGN_UP = 3  # user.created, workspace.created, email.sent
IN_FLIGHT = 32
MARKER = "signup-bench"
PROFILE_MARKER = "signup-profile"
"""``--profile`` writes its own section: it does not replace the figures."""


_T0 = time.perf_counter()


def say(text: str = "") -> None:
    print(text, flush=True)


def header(text: str) -> None:
    say(f"\n{text}   [{time.perf_counter() - _T0:.0f} s into the run]")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- the mail sink -------------------------------------------------------------------------


class SinkChild(SinkProcess):
    """The SMTP sink, in a child process: it reports each mail's arrival time and recipient
    on its stdout."""

    def __init__(self) -> None:
        super().__init__("bench.signup_bench")
        self.count = 0
        self.arrived: dict[str, float] = {}

    def on_line(self, line: str) -> None:
        when, _, address = line.strip().partition(" ")
        self.arrived[address] = float(when)
        self.count += 1


def smtp_child() -> None:
    class Sink(MailSink):
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            reply = await super().handle_DATA(server, session, envelope)
            now = time.time()
            self.messages.clear()  # only the arrival is reported: memory stays flat
            for address in envelope.rcpt_tos:
                print(f"{now:.6f} {address}", flush=True)
            return reply

    serve_sink(Sink())


# -- reading processes ----------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and its parts (``RssAnon``: heaps; ``RssFile``, ``RssShmem``: mappings such as
    SQLite's ``-shm`` files) from ``/proc/<pid>/status``, KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            found[key] = int(value.split()[0])
    return found


def machine_jiffies() -> tuple[int, int, int]:
    """(busy, total, steal) over every CPU since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    steal = values[7] if len(values) > 7 else 0
    return sum(values) - idle, sum(values), steal


@dataclass
class CpuUse:
    """CPU seconds each process spent in a window, and how busy the whole machine was."""

    seconds: dict[str, float]
    wall: float
    machine_busy: float
    """Fraction of all CPUs busy (anyone's work), 0..1."""
    steal: float

    def line(self, signups: int) -> str:
        per = ", ".join(
            f"{name} {s / signups * 1000:.2f} ms ({s / self.wall:.0%} of a core)"
            for name, s in self.seconds.items()
        )
        ours = sum(self.seconds.values()) / self.wall / (os.cpu_count() or 1)
        return (
            f"CPU per sign-up: {per}; total {sum(self.seconds.values()) / signups * 1000:.2f} ms. "
            f"Machine {self.machine_busy:.0%} busy ({ours:.0%} ours), steal {self.steal:.0%}"
        )

    @property
    def busiest(self) -> str:
        return max(self.seconds, key=lambda n: self.seconds[n])

    def cell(self, signups: int) -> str:
        """CPU ms per sign-up of each process, and their total: a table cell."""
        if not signups:
            return "—"
        each = ", ".join(f"{n} {s / signups * 1000:.2f}" for n, s in self.seconds.items())
        return f"{each} ms (total {sum(self.seconds.values()) / signups * 1000:.2f} ms)"

    def table(self, signups: int) -> str:
        """Each process: CPU per sign-up and share of a core over the window."""
        rows = [
            [name, f"{s / signups * 1000:.2f} ms", f"{s / self.wall:.0%}"]
            for name, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])
        ]
        rows.append(["all", f"{sum(self.seconds.values()) / signups * 1000:.2f} ms", ""])
        return table(["process", "CPU per sign-up", "of a core"], rows)


class CpuMeter:
    def __init__(self, stack: Stack) -> None:
        self.pids: dict[str, list[int]] = {
            name: [p.process.pid] for name, p in stack.services.items() if p.process is not None
        }
        if broker := pids_named("beam.smp"):  # the local RabbitMQ
            self.pids["rabbitmq"] = broker
        self.pids["load generator"] = [os.getpid()]
        sink: Any = stack.mail
        if isinstance(sink, SinkChild) and sink.process is not None:
            self.pids["smtp sink"] = [sink.process.pid]
        otlp: Any = stack.otlp
        if isinstance(otlp, OtlpChild):
            self.pids["otlp receiver"] = [otlp.process.pid]

    def _read(self) -> dict[str, dict[int, float]]:
        return {name: {p: cpu_seconds(p) for p in pids} for name, pids in self.pids.items()}

    def start(self) -> None:
        self._t = time.monotonic()
        self._cpu = self._read()
        self._machine = machine_jiffies()

    def stop(self) -> CpuUse:
        wall = time.monotonic() - self._t
        cpu = self._read()
        busy, total, steal = (b - a for a, b in zip(self._machine, machine_jiffies(), strict=True))
        return CpuUse(
            {  # a process that ended meanwhile (a broker restarted by others) counts 0
                n: sum(max(cpu[n][p] - self._cpu[n][p], 0.0) for p in cpu[n]) for n in cpu
            },
            wall,
            busy / total if total else float("nan"),
            steal / total if total else 0.0,
        )


def stamp(value: str) -> float:
    """An API timestamp as POSIX seconds; naive ones (SQLite) are UTC."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


# -- the stack -----------------------------------------------------------------------------


@dataclass
class OtlpChild:
    """A real OTLP/HTTP receiver in a child process, so decoding spans does not take the
    load generator's GIL (its CPU is counted with the services')."""

    process: subprocess.Popen[str]
    endpoint: str

    @classmethod
    def start(cls) -> OtlpChild:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.signup_bench", "--otlp-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        return cls(process, process.stdout.readline().strip())

    def finish(self) -> dict[str, int]:
        """Close the receiver; the spans it received, by ``service|kind|first word of name``."""
        out, _ = self.process.communicate("", timeout=60)
        lines = out.strip().splitlines()
        return json.loads(lines[-1]) if lines else {}


def otlp_child() -> None:
    with OtlpReceiver() as receiver:
        print(receiver.endpoint, flush=True)
        sys.stdin.read()  # until the parent closes it
        spans = receiver.snapshot()
    kinds = Counter(f"{s.service}|{s.kind}|{(s.name.split() or ['?'])[0]}" for s in spans)
    print(json.dumps(kinds), flush=True)


@dataclass
class ProfiledProcess(ServiceProcess):
    """A service started under ``bench.profiled`` (cProfile on every thread): ``SIGUSR1``
    opens the profiled window, ``SIGUSR2`` writes it to :attr:`profile_out`."""

    profile_out: Path = Path("service.pstats")

    def start(self) -> None:
        self._close_log()
        log = self.log_path.open("ab")
        self._log = log
        module = f"tributary.{module_of(self.name)}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.profiled", str(self.profile_out), module],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@dataclass
class BenchStack(Stack):
    """A :class:`Stack` that waits longer for its services on a busy machine and, with a
    ``profile_dir``, runs them under ``bench.profiled`` (their profiles in that folder)."""

    profile_dir: Path | None = None
    ready_timeout: float = 300.0

    def start(self, names: tuple[str, ...] = SIGNUP_SERVICES) -> None:
        for name in names:
            self.ports.setdefault(name, free_port())
        for name in names:
            port = self.ports[name]
            env, log = self.env_for(name, port), self.workdir / f"{name}.log"
            if self.profile_dir is None:
                process = ServiceProcess(name, port, env, log)
            else:
                out = self.profile_dir / f"{name}.pstats"
                process = ProfiledProcess(name, port, env, log, profile_out=out)
            self.services[name] = process
            process.start()
        for name in names:  # start-ups (imports, migrations) are slow under load or profiling
            self.services[name].wait_ready(timeout=self.ready_timeout)


class Running:
    """A started stack (four services on fresh SQLite files, its SMTP sink and, when tracing,
    its OTLP receiver); ``close()`` removes processes, queues, exchanges and files."""

    def __init__(
        self,
        url: str,
        otlp: OtlpChild | None,
        extra_env: dict[str, str],
        profile_dir: Path | None = None,
    ) -> None:
        self.url = url
        self.otlp = otlp
        self.workdir = Path(tempfile.mkdtemp(prefix="tributary-signup-bench-"))
        self.sink = SinkChild()
        self.spans: dict[str, int] = {}
        self.stack: Stack = BenchStack(
            profile_dir=profile_dir,
            broker_url=url,
            workdir=self.workdir,
            database_urls={
                n: f"sqlite+aiosqlite:///{self.workdir / (n + '.db')}" for n in SIGNUP_SERVICES
            },
            prefix=f"signupbench{uuid.uuid4().hex[:8]}.",
            mail=self.sink,  # type: ignore[arg-type]
            otlp=otlp,  # type: ignore[arg-type]
            extra_env=extra_env,
        )

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        tracing: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        profile_dir: Path | None = None,
    ) -> Running:
        """``tracing``: the sampler variables (spans exported to a fresh receiver); None: off.
        ``profile_dir``: the services run under cProfile (``bench.profiled``)."""
        otlp = await asyncio.to_thread(OtlpChild.start) if tracing is not None else None
        running = cls(url, otlp, {**(env or {}), **(tracing or {})}, profile_dir)
        try:
            await running.sink.start()
            started = time.perf_counter()
            await asyncio.to_thread(running.stack.start)
        except BaseException:
            for process in running.stack.services.values():
                say(f"  --- {process.name} log tail ---\n{process.tail(15)}")
            await running.close()
            raise
        took = time.perf_counter() - started
        say(f"  stack up in {took:.1f} s (prefix {running.stack.prefix})")
        return running

    async def close(self) -> None:
        for process in self.stack.services.values():  # all at once: graceful stops overlap
            process.signal(signal.SIGTERM)
        await asyncio.to_thread(self.stack.stop)
        await self.sink.stop()
        if self.otlp is not None:
            self.spans = await asyncio.to_thread(self.otlp.finish)
        await delete_prefixed(self.url, Names(self.stack.prefix), queue_names(self.stack.prefix))
        shutil.rmtree(self.workdir, ignore_errors=True)


@asynccontextmanager
async def signup_stack(url: str, env: dict[str, str] | None = None) -> AsyncIterator[Stack]:
    running = await Running.open(url, env=env)
    try:
        yield running.stack
    finally:
        await running.close()


# -- sign-ups --------------------------------------------------------------------------------


@dataclass
class SignUp:
    email: str
    cid: str
    user_id: str = ""
    posted: float = 0.0
    """Wall clock when the POST was sent."""
    created: float = 0.0
    """Wall clock when the 201 arrived."""
    error: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.user_id)


def new_signups(n: int, tag: str) -> list[SignUp]:
    run = uuid.uuid4().hex[:6]
    return [SignUp(f"ada.{tag}.{run}.{i}@example.com", f"sb-{tag}-{run}-{i}") for i in range(n)]


@dataclass
class Done:
    """When each sign-up of a batch was fully processed (POSIX seconds)."""

    at: dict[str, float]
    entries: dict[str, dict[str, float]]

    def last(self) -> float:
        return max(self.at.values())


class Flow:
    """Sign-ups against one stack, and telling when they are done."""

    def __init__(self, stack: Stack, in_flight: int = IN_FLIGHT) -> None:
        self.stack = stack
        self.in_flight = in_flight
        self.sink: SinkChild = stack.mail  # type: ignore[assignment]
        self.clients = {
            name: httpx.AsyncClient(
                base_url=stack.url(name),
                timeout=30,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
                # sign-up is public and sent without a token, as users do; reads need an admin's
                auth=None if name == "identity" else stack.auth(),
            )
            for name in SIGNUP_SERVICES
        }
        self.total = 0
        """Sign-ups accepted (201) on this stack so far."""
        self.after_seq = 0
        self.entries: dict[str, dict[str, float]] = {}
        """Audit entries read so far: correlation id -> type -> recorded_at."""

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    async def post(self, s: SignUp) -> None:
        s.posted = time.time()
        try:
            response = await self.clients["identity"].post(
                "/users",
                json={"email": s.email, "name": "Ada Lovelace", "plan": "free", "locale": "en-GB"},
                headers={"X-Correlation-ID": s.cid},
            )
        except httpx.HTTPError as exc:
            s.error = f"{type(exc).__name__}: {exc}"
            return
        s.created = time.time()
        if response.status_code == 201:
            s.user_id = response.json()["id"]
            self.total += 1
        else:
            s.error = f"{response.status_code} {response.text[:200]}"

    async def post_all(self, signups: Sequence[SignUp]) -> None:
        pending = iter(signups)

        async def worker() -> None:
            for s in pending:
                await self.post(s)

        await asyncio.gather(*(worker() for _ in range(min(self.in_flight, len(signups)))))
        failed = [s for s in signups if not s.ok]
        if failed:
            say(f"  !! {len(failed)} of {len(signups)} sign-ups failed: {failed[0].error}")

    async def post_paced(self, signups: Sequence[SignUp], per_second: float) -> float:
        """Open loop: sign-up ``i`` is sent at ``i / per_second`` s, whatever came back."""
        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        for i, s in enumerate(signups):
            if (delay := start + i / per_second - time.perf_counter()) > 0:
                await asyncio.sleep(delay)  # the pacing itself, not a wait for a state
            tasks.append(asyncio.create_task(self.post(s)))
        sent_in = time.perf_counter() - start
        await asyncio.gather(*tasks)
        failed = [s for s in signups if not s.ok]
        if failed:
            say(f"  !! {len(failed)} of {len(signups)} sign-ups failed: {failed[0].error}")
        return (len(signups) - 1) / sent_in if sent_in > 0 else float("nan")

    async def metric(self, service: str, outcome: str = "processed") -> float:
        response = await self.clients[service].get("/metrics")
        response.raise_for_status()
        total = 0.0
        for line in response.text.splitlines():
            if line.startswith("tributary_events_consumed_total{") and (
                f'outcome="{outcome}"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def handler_seconds(self) -> dict[str, tuple[float, float]]:
        """Per consuming service: (seconds in handlers, events handled) so far."""
        found: dict[str, tuple[float, float]] = {}
        for name in ("onboarding", "email", "audit"):
            response = await self.clients[name].get("/metrics")
            total = count = 0.0
            for line in response.text.splitlines():
                if line.startswith("tributary_handler_duration_seconds_sum{"):
                    total += float(line.rsplit(" ", 1)[1])
                elif line.startswith("tributary_handler_duration_seconds_count{"):
                    count += float(line.rsplit(" ", 1)[1])
            found[name] = (total, count)
        return found

    async def outcomes(self) -> dict[str, int]:
        """Every non-processed outcome, across the services (should all be 0)."""
        found: dict[str, int] = {}
        for outcome in ("duplicate", "retried", "dead_lettered"):
            found[outcome] = int(
                sum([await self.metric(name, outcome) for name in SIGNUP_SERVICES])
            )
        return found

    async def read_audit(self) -> None:
        """Read the audit entries recorded since the last call (cursor paging)."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            else:
                params["after_seq"] = self.after_seq
            response = await self.clients["audit"].get("/audit", params=params)
            response.raise_for_status()
            page = response.json()
            for entry in page["entries"]:
                cid = entry["correlation_id"] or ""
                self.entries.setdefault(cid, {})[entry["type"]] = stamp(entry["recorded_at"])
                self.after_seq = entry["seq"]
            cursor = page["next"]
            if not cursor:
                return

    async def settle(self, signups: Sequence[SignUp], timeout: float) -> Done:
        """Wait until every accepted sign-up so far is fully processed; their completion times."""
        deadline = time.monotonic() + timeout

        async def counted() -> bool:
            return self.sink.count >= self.total and (
                await self.metric("audit") >= AUDITED_PER_SIGN_UP * self.total
            )

        try:
            await eventually(counted, timeout=timeout, what="mails and audit entries", poll=0.25)
        except TimeoutError:
            raise TimeoutError(await self.stuck()) from None
        ok = [s for s in signups if s.ok]
        missing: list[SignUp] = []

        async def complete() -> bool:
            await self.read_audit()
            missing[:] = [
                s
                for s in ok
                if s.email not in self.sink.arrived
                or not {USER_CREATED, WORKSPACE_CREATED} <= self.entries.get(s.cid, {}).keys()
            ]
            return not missing

        try:
            left = max(deadline - time.monotonic(), 0.0)
            await eventually(complete, timeout=left, what="every sign-up complete", poll=0.5)
        except TimeoutError:
            raise TimeoutError(
                f"{len(missing)} sign-ups incomplete; " + await self.stuck()
            ) from None
        at = {
            s.cid: max(
                self.sink.arrived[s.email],
                self.entries[s.cid][USER_CREATED],
                self.entries[s.cid][WORKSPACE_CREATED],
            )
            for s in ok
        }
        return Done(at, self.entries)

    async def stuck(self) -> str:
        audited = await self.metric("audit")
        return (
            f"{self.total} sign-ups accepted, {self.sink.count} mails, {audited:.0f} audited "
            f"(of {AUDITED_PER_SIGN_UP * self.total}); other outcomes {await self.outcomes()}"
        )

    def rss(self) -> dict[str, dict[str, int]]:
        return {
            name: memory_kib(p.process.pid)
            for name, p in self.stack.services.items()
            if p.process is not None
        }


# -- the figures -----------------------------------------------------------------------------


@dataclass
class Throughput:
    n: int
    seconds: float
    """First POST to the last completion."""
    post_wall: float
    """First POST to the last 201."""
    post_seconds: list[float]
    """Each POST's time to its 201."""
    cpu: CpuUse
    handlers: dict[str, tuple[float, float]]
    """Per consuming service: seconds inside handlers, events handled."""

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    @property
    def post_rate(self) -> float:
        """Sign-ups/s identity answered 201."""
        return self.n / self.post_wall

    @property
    def handler_ms(self) -> dict[str, float]:
        """Mean time inside the handler per event, per consuming service (ms)."""
        return {k: total / count * 1000 for k, (total, count) in self.handlers.items() if count}

    @property
    def services_cpu_ms(self) -> float:
        """CPU of the four services per sign-up (ms): less noisy than a rate here."""
        return sum(self.cpu.seconds.get(n, 0.0) for n in SIGNUP_SERVICES) / self.n * 1000

    @classmethod
    def combine(cls, parts: Sequence[Throughput]) -> Throughput:
        """Rounds of one contender: their sign-ups over their summed times."""
        wall = sum(p.cpu.wall for p in parts)
        names = list(dict.fromkeys(k for p in parts for k in p.cpu.seconds))
        handlers = list(dict.fromkeys(k for p in parts for k in p.handlers))
        return cls(
            sum(p.n for p in parts),
            sum(p.seconds for p in parts),
            sum(p.post_wall for p in parts),
            [x for p in parts for x in p.post_seconds],
            CpuUse(
                {k: sum(p.cpu.seconds.get(k, 0.0) for p in parts) for k in names},
                wall,
                sum(p.cpu.machine_busy * p.cpu.wall for p in parts) / wall,
                sum(p.cpu.steal * p.cpu.wall for p in parts) / wall,
            ),
            {
                k: (
                    sum(p.handlers.get(k, (0.0, 0.0))[0] for p in parts),
                    sum(p.handlers.get(k, (0.0, 0.0))[1] for p in parts),
                )
                for k in handlers
            },
        )


async def warm_up(flow: Flow, n: int, tag: str) -> None:
    batch = new_signups(n, f"{tag}w")
    await flow.post_all(batch)
    await flow.settle(batch, timeout=120)


async def throughput(flow: Flow, n: int, warmup: int, tag: str) -> Throughput:
    """``warmup`` sign-ups (settled), then ``n`` at ``in_flight`` concurrency, timed."""
    if warmup:
        await warm_up(flow, warmup, tag)
    batch = new_signups(n, tag)
    handlers_before = await flow.handler_seconds()
    meter = CpuMeter(flow.stack)
    meter.start()
    start = time.time()
    await flow.post_all(batch)
    posted = max(s.created for s in batch if s.ok)
    done = await flow.settle(batch, timeout=max(120.0, n / 20))
    cpu = meter.stop()
    handlers = {
        name: (total - handlers_before[name][0], count - handlers_before[name][1])
        for name, (total, count) in (await flow.handler_seconds()).items()
    }
    ok = [s for s in batch if s.ok]
    return Throughput(
        len(ok),
        done.last() - start,
        posted - start,
        [s.created - s.posted for s in ok],
        cpu,
        handlers,
    )


def show_throughput(label: str, t: Throughput) -> None:
    say(
        f"  {label}: {t.n:,} sign-ups fully processed in {t.seconds:.2f} s = {t.rate:,.0f}/s "
        f"(identity answered them at {t.post_rate:,.0f}/s; POST p50 "
        f"{ms(percentile(t.post_seconds, 50))}, p99 {ms(percentile(t.post_seconds, 99))})"
    )
    say(f"    {t.cpu.line(t.n)}")
    say(
        "    mean time in the handler per event: "
        + ", ".join(f"{name} {v:.2f} ms" for name, v in t.handler_ms.items())
    )


@dataclass
class Latency:
    p50: float
    p99: float
    achieved: float
    n: int
    parts: dict[str, tuple[float, float]]
    cpu: CpuUse


async def latency(flow: Flow, per_second: float, seconds: float) -> Latency:
    batch = new_signups(round(per_second * seconds), "lat")
    meter = CpuMeter(flow.stack)
    meter.start()
    achieved = await flow.post_paced(batch, per_second)
    done = await flow.settle(batch, timeout=120)
    cpu = meter.stop()
    ok = [s for s in batch if s.ok]
    say(f"    {cpu.line(len(ok))}")
    # after the run (not during it): what each service committed, read through its API
    limit = asyncio.Semaphore(8)
    workspace_at: dict[str, float] = {}
    sent_at: dict[str, float] = {}

    async def read(s: SignUp) -> None:
        async with limit:
            ws = await flow.clients["onboarding"].get("/workspaces", params={"owner_id": s.user_id})
            mails = await flow.clients["email"].get("/emails", params={"to": s.email})
        [workspace] = ws.json()
        [mail] = mails.json()
        workspace_at[s.cid] = stamp(workspace["created_at"])
        sent_at[s.cid] = stamp(mail["sent_at"])

    await asyncio.gather(*(read(s) for s in ok))
    parts_of: dict[str, list[float]] = {
        "workspace created_at": [workspace_at[s.cid] - s.created for s in ok],
        "email sent_at": [sent_at[s.cid] - s.created for s in ok],
        "audit user.created": [done.entries[s.cid][USER_CREATED] - s.created for s in ok],
        "audit workspace.created": [done.entries[s.cid][WORKSPACE_CREATED] - s.created for s in ok],
        "mail at the sink": [flow.sink.arrived[s.email] - s.created for s in ok],
        "POST (send -> 201)": [s.created - s.posted for s in ok],
    }
    total = [
        max(
            workspace_at[s.cid],
            sent_at[s.cid],
            done.entries[s.cid][USER_CREATED],
            done.entries[s.cid][WORKSPACE_CREATED],
        )
        - s.created
        for s in ok
    ]
    with_sent = [
        done.entries[s.cid].get(EMAIL_SENT, float("nan")) - s.created
        for s in ok
        if EMAIL_SENT in done.entries[s.cid]
    ]
    parts_of["audit email.sent (not in the figure)"] = with_sent
    parts = {k: (percentile(v, 50), percentile(v, 99)) for k, v in parts_of.items()}
    return Latency(percentile(total, 50), percentile(total, 99), achieved, len(ok), parts, cpu)


async def raw_broker(url: str, n: int) -> tuple[Sample, float]:
    """Publish ``n`` 1 KB persistent messages pipelined with confirms (256 in flight) while a
    second connection consumes and acks them (prefetch 256); (messages end to end with the
    CPU of this process and RabbitMQ, publish msg/s).
    """
    queue_name = f"signupbench{uuid.uuid4().hex[:8]}.raw"
    events = Events.make(n)
    clock = Clock(n)
    async with AsyncExitStack() as stack:
        publishing = await aio_pika.connect(url)
        stack.push_async_callback(publishing.close)
        consuming = await aio_pika.connect(url)
        stack.push_async_callback(consuming.close)
        channel = await consuming.channel()
        await channel.set_qos(prefetch_count=256)
        queue = await channel.declare_queue(queue_name, durable=True, arguments=dict(QUORUM))
        try:

            async def on_message(message: AbstractIncomingMessage) -> None:
                await message.ack()
                clock.tick()

            tag = await queue.consume(on_message)
            confirms = await publishing.channel(publisher_confirms=True)
            limit = asyncio.Semaphore(256)

            async def one(i: int) -> None:
                async with limit:
                    await confirms.default_exchange.publish(events.message(i), queue_name)

            meter = Meter()
            meter.start()
            start = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            published = time.perf_counter() - start
            await clock.wait(max(60.0, n / 200), "raw consume")
            total = time.perf_counter() - start
            sample = meter.stop(n, total)
            await queue.cancel(tag)
        finally:
            await channel.queue_delete(queue_name)
    return sample, n / published


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Plan:
    n: int
    warmup: int
    latency_seconds: float
    raw_n: int
    rss_marks: tuple[int, int]
    in_flight: int = IN_FLIGHT
    rate: float = 0.0
    """Sign-ups/s of figure 3; 0: half the capacity figure 2 measured."""
    """Sign-ups/s of the latency figure."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every service (experiments: ``--env TRIBUTARY_PREFETCH=64``)."""

    @classmethod
    def of(
        cls, quick: bool, in_flight: int, rate: float, env: dict[str, str], n: int | None = None
    ) -> Plan:
        """The full plan, ``--quick``'s, or (``n``: ``-n``) one scaled to ``n`` sign-ups per
        throughput figure (a smoke run: a tenth as warm-up, raw broker 20 messages a sign-up,
        latency for ``n / rate`` s (``n / 50`` s at the default rate), RSS up to 5 x n)."""
        if n is not None:
            warm = max(n // 10, 2)
            seconds = max(n / (rate or 50.0), 1.0)
            return cls(n, warm, seconds, 20 * n, (n + warm, 5 * n), in_flight, rate, env)
        if quick:
            return cls(300, 30, 8.0, 5_000, (330, 1_500), in_flight, rate, env)
        return cls(2_000, 100, 20.0, 10_000, (2_100, 10_000), in_flight, rate, env)

    @property
    def small(self) -> bool:
        return self.n < 2_000


TRACING: dict[str, dict[str, str] | None] = {
    "off": None,
    "10 % parent-based": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
    "always on": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}


@dataclass
class Bench:
    url: str
    plan: Plan
    only: set[int]
    rows: list[Row] = field(default_factory=list)
    raw: Sample | None = None
    blocks: list[str] = field(default_factory=list)
    """Markdown after the results table: each figure's details (tables and lines)."""
    closing: list[asyncio.Task[None]] = field(default_factory=list)
    """Stacks being removed in the background (awaited before anything is measured)."""

    def row(self, *args: Any, **kwargs: Any) -> None:
        self.rows.append(Row(*args, **kwargs))

    def block(self, title: str, *parts: str) -> None:
        self.blocks.append("\n\n".join([f"**{title}**", *parts]))

    def close_later(self, running: Running) -> None:
        self.closing.append(asyncio.create_task(running.close()))

    async def quiet(self) -> None:
        """Every stack that is being removed is gone (nothing else runs while measuring)."""
        await asyncio.gather(*self.closing)

    async def run(self) -> None:
        try:
            if 1 in self.only:
                header("1. raw broker: pipelined confirmed publish + consume/ack, 1 KB, quorum")
                self.raw, publish_only = await raw_broker(self.url, self.plan.raw_n)
                say(
                    f"  {self.plan.raw_n:,} messages: {self.raw.rate:,.0f} msg/s end to end "
                    f"(publishing alone finished at {publish_only:,.0f} msg/s)"
                )
                self.row(
                    f"1 raw broker, publish→consume/ack (1 KB, quorum, {self.plan.raw_n:,})",
                    f"{self.raw.rate:,.0f} msg/s",
                    cpu_cell(self.raw),
                    f"for scale (publishing alone: {publish_only:,.0f} msg/s)",
                )
            if self.only & {2, 3, 4}:
                await self.main_stack()
            if 5 in self.only:
                await self.tracing()
        finally:
            await self.quiet()

    async def main_stack(self) -> None:
        plan = self.plan
        header("2. throughput (tracing off), then 3. latency and 4. RSS on the same stack")
        running = await Running.open(self.url, env=plan.env)
        flow = Flow(running.stack, plan.in_flight)
        try:
            t = await throughput(flow, plan.n, plan.warmup, "tp")
            show_throughput("throughput", t)
            raw = self.raw
            self.row(
                f"2 sign-ups fully processed ({plan.n:,}, {plan.in_flight} in flight)",
                f"{t.rate:,.0f} /s",
                t.cpu.cell(t.n),
                f"not like for like, for scale: raw broker {raw.rate:,.0f} msg/s (1; a "
                "sign-up is 3 confirmed publishes and 5 deliveries)"
                if raw
                else "—",
                f"{cpu_cell(raw)} per message" if raw else "—",
                f"{t.rate / raw.rate:.3f} of raw msg/s" if raw else "—",
                "≥ 150 /s (stretch 200)",
                t.rate >= 150,
            )
            services = sum(t.cpu.seconds.get(name, 0.0) for name in SIGNUP_SERVICES)
            self.row(
                "2 CPU per sign-up, the four services together",
                f"{services / t.n * 1000:.2f} ms",
                "(a CPU cost)",
                "each service's share: see the CPU table of figure 2",
                target="≤ 10 ms",
                met=services / t.n <= 0.010,
            )
            busiest = t.cpu.busiest
            self.row(
                "2 busiest process during 2 (CPU per sign-up)",
                f"{busiest} {t.cpu.seconds[busiest] / t.n * 1000:.2f} ms",
                f"{t.cpu.seconds[busiest] / t.cpu.wall:.0%} of a core",
                f"all processes: {sum(t.cpu.seconds.values()) / t.n * 1000:.2f} ms",
            )
            self.block(
                f"Figure 2: {t.n:,} sign-ups in {t.seconds:.1f} s; identity answered the POSTs "
                f"at {t.post_rate:,.0f}/s, POST p50 {ms(percentile(t.post_seconds, 50))}, "
                f"p99 {ms(percentile(t.post_seconds, 99))}; machine {t.cpu.machine_busy:.0%} "
                f"busy, steal {t.cpu.steal:.0%}",
                t.cpu.table(t.n),
                table(
                    ["consumer", "mean time in the handler per event"],
                    [[name, f"{v:.2f} ms"] for name, v in t.handler_ms.items()],
                ),
            )
            rss = [(flow.total, flow.rss())]  # after the warm-up and figure 2
            if 3 in self.only:
                if self.plan.rate <= 0:  # at half the capacity figure 2 measured
                    self.plan.rate = round(t.rate / 2, 1)
                await self.latency_figure(flow)
                rss.append((flow.total, flow.rss()))  # after figure 3 too: its own step shows
            if 4 in self.only:
                more = plan.rss_marks[1] - flow.total
                header(f"4. RSS: {more:,} more sign-ups, to {plan.rss_marks[1]:,}")
                started = time.perf_counter()
                chunks = 4
                for c in range(chunks):
                    batch = new_signups(more * (c + 1) // chunks - more * c // chunks, "rss")
                    await flow.post_all(batch)
                    await flow.settle(batch, timeout=max(180.0, len(batch) / 10))
                    rss.append((flow.total, flow.rss()))
                say(f"  {more:,} sign-ups fully processed in {time.perf_counter() - started:.1f} s")
                self.rss(rss)
            outcomes = await flow.outcomes()
            say(f"  other outcomes across the services: {outcomes}")
            self.blocks.append(
                "Outcomes other than processed across the services (figures 2-4): "
                + ", ".join(f"{k} {v}" for k, v in outcomes.items())
            )
        finally:
            await flow.close()
            self.close_later(running)

    async def latency_figure(self, flow: Flow) -> None:
        plan = self.plan
        header(f"3. latency at {plan.rate:g} sign-ups/s for {plan.latency_seconds:.0f} s")
        lat = await latency(flow, plan.rate, plan.latency_seconds)
        say(
            f"  {lat.n:,} sign-ups at {lat.achieved:.1f}/s: 201 -> last commit "
            f"p50 {ms(lat.p50)}, p99 {ms(lat.p99)}"
        )
        for part, (p50, p99) in lat.parts.items():
            say(f"    {part:<38} p50 {ms(p50):>10}  p99 {ms(p99):>10}")
        post50, post99 = lat.parts["POST (send -> 201)"]
        self.row(
            f"3 sign-ups at {plan.rate:g} /s (open loop, {lat.n:,})",
            f"{lat.achieved:.1f} /s sent",
            lat.cpu.cell(lat.n),
        )
        self.row(
            f"3 latency p50, 201 → last consumer commit ({plan.rate:g} /s)",
            ms(lat.p50),
            "(a latency)",
            f"the POST itself: {ms(post50)}",
        )
        self.row(
            f"3 latency p99, 201 → last consumer commit ({plan.rate:g} /s)",
            ms(lat.p99),
            "(a latency)",
            f"the POST itself: {ms(post99)}",
            target="≤ 50 ms",
            met=lat.p99 <= 0.050,
        )
        self.block(
            f"Figure 3: each part from the 201 ({lat.n:,} sign-ups at {lat.achieved:.1f}/s)",
            table(
                ["part", "p50", "p99"],
                [[part, ms(p50), ms(p99)] for part, (p50, p99) in lat.parts.items()],
            ),
            lat.cpu.table(lat.n),
        )

    def rss(self, marks: list[tuple[int, dict[str, dict[str, int]]]]) -> None:
        say("  VmRSS (MiB) after " + ", ".join(f"{n:,}" for n, _ in marks) + " sign-ups:")
        (first_at, first), (last_at, last) = marks[0], marks[-1]
        for name in SIGNUP_SERVICES:
            a, b = first[name], last[name]
            growth = b["VmRSS"] / a["VmRSS"] - 1
            path = "  ".join(f"{kib[name]['VmRSS'] / 1024:6.1f}" for _, kib in marks)
            parts = ", ".join(
                f"{k} {(b.get(k, 0) - a.get(k, 0)) / 1024:+.1f}"
                for k in ("RssAnon", "RssFile", "RssShmem")
            )
            say(f"    {name:<10} {path}   {growth:+.1%} ({parts} MiB)")
            self.row(
                f"4 RSS {name}, after {last_at:,} vs {first_at:,} sign-ups",
                f"{b['VmRSS'] / 1024:.1f} MiB",
                "(a size)",
                f"the same process after {first_at:,}: {a['VmRSS'] / 1024:.1f} MiB",
                "—",
                f"{growth:+.1%}",
                "≤ +5 %",
                growth <= 0.05,
            )
        self.block(
            "Figure 4: `VmRSS` (MiB) after the given number of sign-ups, and the growth by kind",
            table(
                ["service", *(f"{n:,}" for n, _ in marks), "RssAnon", "RssFile", "RssShmem"],
                [
                    [
                        name,
                        *(f"{kib[name]['VmRSS'] / 1024:.1f}" for _, kib in marks),
                        *(
                            f"{(last[name].get(k, 0) - first[name].get(k, 0)) / 1024:+.1f}"
                            for k in ("RssAnon", "RssFile", "RssShmem")
                        ),
                    ]
                    for name in SIGNUP_SERVICES
                ],
            ),
        )

    async def tracing_stacks(self) -> dict[str, Running]:
        """One fresh stack per tracing setting, started together."""
        opened = await asyncio.gather(
            *(Running.open(self.url, tracing=t, env=self.plan.env) for t in TRACING.values()),
            return_exceptions=True,
        )
        stacks = {m: r for m, r in zip(TRACING, opened, strict=True) if isinstance(r, Running)}
        if failed := [r for r in opened if isinstance(r, BaseException)]:
            for running in stacks.values():
                await running.close()
            raise failed[0]
        return stacks

    async def tracing(self) -> None:
        plan = self.plan
        rounds = 2 if plan.n < 1_000 else 4
        header(
            f"5. tracing cost: {plan.n:,} sign-ups per setting, each on a fresh stack of its own "
            f"(warm-up {plan.warmup}), measured in {rounds} interleaved rounds of "
            f"{plan.n // rounds:,} (rotating order; the machine is shared, its load drifts)"
        )
        stacks = await self.tracing_stacks()
        flows = {mode: Flow(running.stack, plan.in_flight) for mode, running in stacks.items()}
        parts: dict[str, list[Throughput]] = {mode: [] for mode in TRACING}
        modes = list(TRACING)
        try:
            for flow in flows.values():
                await warm_up(flow, plan.warmup, "tr")
            await self.quiet()
            for r in range(rounds):
                for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                    parts[mode].append(await throughput(flows[mode], plan.n // rounds, 0, "tr"))
                say(
                    f"  round {r + 1}: "
                    + ", ".join(f"{m} {parts[m][-1].rate:,.1f}/s" for m in modes)
                )
        finally:
            for mode, flow in flows.items():
                await flow.close()
                self.close_later(stacks[mode])
        runs = {mode: Throughput.combine(parts[mode]) for mode in modes}
        for mode in modes:
            show_throughput(f"tracing {mode}", runs[mode])
        await self.quiet()  # the receivers have every span once the services have stopped
        signups = plan.warmup + sum(t.n for t in runs.values()) // len(runs)
        for mode, running in stacks.items():
            if TRACING[mode] is None:
                continue
            total = sum(running.spans.values())
            per_service: Counter[str] = Counter()
            for key, count in running.spans.items():
                per_service[key.split("|")[0]] += count
            say(
                f"  spans received, tracing {mode}: {total:,} ({total / signups:.1f} per "
                "sign-up): " + ", ".join(f"{k} {v:,}" for k, v in sorted(per_service.items()))
            )
        spans_line = "Spans received per sign-up: " + ", ".join(
            f"{mode} {sum(stacks[mode].spans.values()) / signups:.1f}"
            for mode in modes
            if TRACING[mode] is not None
        )
        full = stacks["always on"].spans  # what a fully traced sign-up is made of
        spans_table = table(
            ["service", "span kind", "first word of the name", "spans per sign-up (always on)"],
            [
                [*key.split("|", 2), f"{count / signups:.1f}"]
                for key, count in sorted(full.items(), key=lambda kv: (kv[0].split("|")[0], -kv[1]))
                if key.count("|") == 2
            ],
        )
        for service in SIGNUP_SERVICES:
            mine = sorted(
                ((k, v) for k, v in full.items() if k.startswith(f"{service}|")),
                key=lambda kv: -kv[1],
            )
            say(
                f"    {service} spans per sign-up (always on): "
                + ", ".join(
                    f"{k.split('|', 1)[1].replace('|', ' ')} {v / signups:.1f}" for k, v in mine[:8]
                )
            )
        off = runs["off"]
        self.row(
            f"5 throughput, tracing off ({rounds} x {plan.n // rounds:,})",
            f"{off.rate:,.0f} /s",
            off.cpu.cell(off.n),
            f"services' CPU {off.services_cpu_ms:.1f} ms/sign-up",
        )
        for mode, target in (("10 % parent-based", 0.10), ("always on", 0.35)):
            t = runs[mode]
            cost = 1 - t.rate / off.rate
            self.row(
                f"5 throughput, tracing {mode} (OTLP export)",
                f"{t.rate:,.0f} /s",
                t.cpu.cell(t.n),
                f"the same flow, tracing off, interleaved rounds: {off.rate:,.0f} /s",
                off.cpu.cell(off.n),
                f"cost {cost:.0%} (services' CPU/sign-up "
                f"{t.services_cpu_ms / off.services_cpu_ms - 1:+.0%})",
                f"cost ≤ {target:.0%}",
                cost <= target,
            )
        self.block(
            "Figure 5: sign-ups/s per round (order rotating)",
            table(
                ["round", *modes],
                [[str(r + 1), *(f"{parts[m][r].rate:.1f}" for m in modes)] for r in range(rounds)],
            ),
            spans_line,
            spans_table,
        )

    def table(self) -> str:
        return results_table(self.rows, unit="sign-up (or message)")


# -- profiling -----------------------------------------------------------------------------


def frame_label(frame: str) -> str:
    """``handle (messaging/consumer.py:230)`` -> ``handle (consumer.py)``."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.rsplit('/', 1)[-1].split(':')[0].rstrip(')')})"


def frame_library(frame: str) -> str:
    """The package a frame's code is in (py-spy names files ``package/module.py``)."""
    where = frame.partition(" (")[2]
    if where.startswith("asyncio/runners.py"):
        return "event loop (uvloop, C: I/O, callbacks, thread wake-ups)"
    if "/" not in where:
        return where.split(":")[0].rstrip(")") or "?"
    return where.split("/", 1)[0]


# frames every sample of a thread has (start-up and the serving loop): not informative
_BOOT = ("<frozen runpy>", "__main__.py", "service/runner.py", "uvicorn/", "asyncio/runners.py")
_BOOT_THREAD = "threading.py"

Share = list[tuple[str, float]]


@dataclass
class Profile:
    samples: int
    own: Share
    """Leaf frames: where the CPU was when sampled."""
    libraries: Share
    """The same, by the package the leaf frame is in."""
    inclusive: Share
    """Frames with their callees (the serving loop and thread starts left out)."""


def read_profile(raw: Path, limit: int = 12) -> Profile:
    """Shares of the samples in a py-spy ``--format raw`` (collapsed stacks) file."""
    own: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frame_label(frames[-1])] += n
        libraries[frame_library(frames[-1])] += n
        for frame in {
            frame_label(f)
            for f in frames
            if not any(b in f for b in _BOOT) and _BOOT_THREAD not in f
        }:
            inclusive[frame] += n

    def share(c: Counter[str]) -> Share:
        return [(f, v / samples) for f, v in c.most_common(limit)] if samples else []

    return Profile(samples, share(own), share(libraries), share(inclusive))


async def py_spy(url: str, plan: Plan, services: Iterable[str], keep: str = "") -> None:
    spy = shutil.which("py-spy")
    if spy is None:
        say("py-spy is not installed: uv run --with py-spy python -m bench.signup_bench --py-spy")
        return
    out = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="tributary-signup-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        async with signup_stack(url, plan.env) as stack:
            flow = Flow(stack, plan.in_flight)
            try:
                batch = new_signups(plan.warmup, "pw")
                await flow.post_all(batch)
                await flow.settle(batch, timeout=120)
                spies: dict[str, asyncio.subprocess.Process] = {}
                for name in services:
                    pid = stack.services[name].process.pid  # type: ignore[union-attr]
                    spies[name] = await asyncio.create_subprocess_exec(
                        spy, "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
                        "--format", "raw", "--output", str(out / f"{name}.txt"),
                        "--duration", "600",
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )  # fmt: skip
                # py-spy says nothing once attached (it writes at the end): a second to attach
                await asyncio.sleep(1.0)
                t = await throughput(flow, plan.n, 0, "prof")
                show_throughput("throughput under py-spy (slower than without)", t)
                for proc in spies.values():
                    proc.send_signal(signal.SIGINT)
                for proc in spies.values():
                    try:
                        await asyncio.wait_for(proc.wait(), 30)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
            finally:
                await flow.close()
        for name in services:
            found = read_profile(out / f"{name}.txt")
            say(f"\n  {name}: {found.samples:,} samples on CPU (100 Hz, every thread)")
            for title, shares in (
                ("by library of the running frame", found.libraries),
                ("running frame", found.own),
                ("frame with its callees", found.inclusive),
            ):
                say(f"   {title}:")
                for frame, share in shares:
                    say(f"    {share:6.1%}  {frame}")
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


# -- profiling with cProfile (no dependency) ---------------------------------------------------

LIBRARIES = (
    "aiosqlite",
    "uvloop/asyncio",
    "sqlalchemy",
    "pydantic",
    "jsonschema",
    "opentelemetry",
    "aio_pika/aiormq",
    "tributary",
    "other",
)
_PACKAGES = {
    "aiosqlite": "aiosqlite",
    "sqlite3": "aiosqlite",  # the driver's own calls, made on aiosqlite's threads
    "uvloop": "uvloop/asyncio",
    "asyncio": "uvloop/asyncio",
    "sqlalchemy": "sqlalchemy",
    "sqlmodel": "sqlalchemy",
    "greenlet": "sqlalchemy",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic",
    "jsonschema": "jsonschema",
    "jsonschema_specifications": "jsonschema",
    "referencing": "jsonschema",
    "rpds": "jsonschema",
    "opentelemetry": "opentelemetry",
    "aio_pika": "aio_pika/aiormq",
    "aiormq": "aio_pika/aiormq",
    "pamqp": "aio_pika/aiormq",
    "tributary": "tributary",
}


def package_of(key: tuple[str, int, str]) -> str:
    """The top-level package (or stdlib module) of a profiled function; ``~`` for a C one."""
    path = key[0].replace("\\", "/")
    if path == "~":
        return "~"
    if "/src/tributary/" in path:
        return "tributary"
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3/"):
        if marker in path:
            return path.split(marker, 1)[1].split("/", 1)[0].removesuffix(".py")
    return path.rsplit("/", 1)[-1].removesuffix(".py")


def library_of(key: tuple[str, int, str]) -> str:
    """The bucket of :data:`LIBRARIES` a function's own time goes to; a C function (``~``)
    goes by its name when it names one (``sqlite3``, ``uvloop``), else by its caller."""
    package = package_of(key)
    if package == "~":
        name = key[2]
        for hint, library in (("sqlite3", "aiosqlite"), ("uvloop", "uvloop/asyncio")):
            if hint in name:
                return library
        if "_asyncio" in name or "select.epoll" in name:
            return "uvloop/asyncio"
        return "~"
    return _PACKAGES.get(package, "other")


@dataclass
class ServiceProfile:
    cpu: float
    """Own CPU seconds of every function, every thread, in the window."""
    libraries: dict[str, float]
    functions: list[tuple[str, float]]


def read_pstats(path: Path | str, limit: int = 8) -> ServiceProfile:
    """Own time by library (a C function's goes to the library of its caller when its name
    does not say) and the costliest functions."""
    stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    libraries: dict[str, float] = dict.fromkeys(LIBRARIES, 0.0)
    functions: list[tuple[str, float]] = []
    for key, (_cc, _nc, tt, _ct, callers) in stats.items():
        library = library_of(key)
        if library == "~":
            by_caller = {c: v[2] for c, v in callers.items()}
            shared = sum(by_caller.values())
            for caller, own in by_caller.items():
                to = library_of(caller)
                libraries[to if to != "~" else "other"] += tt * own / shared if shared else 0.0
            if not shared:
                libraries["other"] += tt
        else:
            libraries[library] += tt
        file, line, name = key
        where = name if file == "~" else f"{name} ({package_of(key)}/{Path(file).name}:{line})"
        functions.append((where, tt))
    functions.sort(key=lambda ft: -ft[1])
    return ServiceProfile(sum(libraries.values()), libraries, functions[:limit])


async def cprofile(url: str, plan: Plan, services: Sequence[str], keep: str = "") -> list[str]:
    """One throughput run with every service under ``bench.profiled``; the profiles cover the
    measured sign-ups only (SIGUSR1 before, SIGUSR2 after). Markdown blocks."""
    out = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="tributary-signup-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        running = await Running.open(url, env=plan.env, profile_dir=out)
        flow = Flow(running.stack, plan.in_flight)
        try:
            await warm_up(flow, plan.warmup, "pw")
            processes = {name: running.stack.services[name] for name in services}

            def written(suffix: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return all((out / f"{n}{suffix}").exists() for n in processes)

                return check

            for name, process in processes.items():
                (out / f"{name}.pstats").unlink(missing_ok=True)
                (out / f"{name}.pstats.open").unlink(missing_ok=True)
                process.signal(signal.SIGUSR1)
            # each service's handler runs at its next bytecode, and says so (bench.profiled)
            await eventually(written(".pstats.open"), timeout=60, what="profile windows open")
            t = await throughput(flow, plan.n, 0, "prof")
            show_throughput("throughput under cProfile (several times slower than without)", t)
            for process in processes.values():
                process.signal(signal.SIGUSR2)
            # bench.profiled renames a whole file into place: there is one, it is complete
            await eventually(written(".pstats"), timeout=60, what="profiles")
            for name in processes:
                (out / f"{name}.pstats.open").unlink(missing_ok=True)
        finally:
            await flow.close()
            await running.close()
        found = {name: read_pstats(out / f"{name}.pstats") for name in services}
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    blocks = [
        f"Under cProfile: {t.n:,} sign-ups at {t.rate:,.1f}/s (slowed by profiling); CPU "
        f"per sign-up: {t.cpu.cell(t.n)}",
        "Own CPU time by library, shares of each service's profiled CPU (every thread, each "
        "thread's CPU time; a C function's time goes to the library that called it, unless "
        "its name says: `sqlite3` calls count as aiosqlite's). How to read it: a deterministic "
        "profiler's own cost per call lands in the profiled functions' time, so call-heavy "
        "code (SQLAlchemy's many small functions) weighs more here than in a sampling profile "
        "(`--py-spy`), and the event loop's own C code between callbacks (uvloop) is not in "
        "it; 'profiled / process CPU' compares the profile's total with the process's CPU "
        "(`/proc`) over the sign-ups (the profile's window is a little wider):",
        table(
            ["service", "CPU per sign-up (/proc)", "profiled / process CPU", *LIBRARIES],
            [
                [
                    name,
                    f"{t.cpu.seconds.get(name, 0.0) / t.n * 1000:.2f} ms",
                    f"{p.cpu / t.cpu.seconds[name]:.0%}" if t.cpu.seconds.get(name) else "—",
                    *(f"{p.libraries[lib] / p.cpu:.0%}" if p.cpu else "—" for lib in LIBRARIES),
                ]
                for name, p in found.items()
            ],
        ),
        "Costliest functions by own CPU time, each service:",
        table(
            ["service", "function (package/file:line)", "share"],
            [
                [name, where.replace("|", "\\|"), f"{own / p.cpu:.1%}" if p.cpu else "—"]
                for name, p in found.items()
                for where, own in p.functions
            ],
        ),
    ]
    for block in blocks:
        say(block)
    return blocks


# -- main ------------------------------------------------------------------------------------


DISTS = ["fastapi", "uvicorn", "uvloop", "sqlalchemy", "sqlmodel", "aiosqlite", "aio-pika"]
DISTS += ["aiormq", "aiosmtplib", "aiosmtpd", "httpx", "opentelemetry-sdk", "pydantic"]


async def main(args: argparse.Namespace) -> str:
    env = dict(item.split("=", 1) for item in args.env)
    plan = Plan.of(args.quick, args.in_flight, args.rate, env, args.n)
    only = {int(x) for x in args.only.split(",")} if args.only else {1, 2, 3, 4, 5}
    profiling = bool(args.profile or args.py_spy)
    with ExitStack() as infra:
        url = find_rabbitmq(infra).url
        section = Section(
            "## Sign-up flow: where the CPU goes" if profiling else "## Sign-up flow",
            "bench.signup_bench",
            versions(DISTS, {"RabbitMQ": await rabbitmq_version(url), "SQLite": sqlite_version()}),
            quick=plan.small,
        )
        say(section.stamp)
        say(section.versions)
        section.settings += [
            "the four services as real processes (`python -m tributary.<name>`: uvicorn on "
            "uvloop), each on a fresh SQLite file (WAL), the local RabbitMQ under a fresh name "
            "prefix, a real SMTP sink and OTLP receiver in child processes; load generator: one "
            "httpx client on uvloop",
            f"sign-ups per throughput figure {plan.n:,} after a warm-up of {plan.warmup:,}, "
            f"{plan.in_flight} POSTs in flight; latency at "
            f"{f'{plan.rate:g}/s' if plan.rate else 'half the capacity of figure 2'} for "
            f"{plan.latency_seconds:g} s; raw broker {plan.raw_n:,} messages; RSS up to "
            f"{plan.rss_marks[1]:,} sign-ups; figures {', '.join(map(str, sorted(only)))}",
            "CPU: each process's user+system time (`/proc/<pid>/stat`) over the figure's window, "
            "per sign-up (raw broker: per message; bench = this process)",
        ]
        if env or plan.in_flight != IN_FLIGHT or plan.rate:
            section.problems.append(
                f"NOT the default set-up: env {env}, {plan.in_flight} POSTs in flight, "
                f"latency at {plan.rate:g}/s"
            )
        if args.py_spy:
            await py_spy(url, plan, args.py_spy.split(","), args.profile_out)
            section.add("(py-spy's shares are printed above the section, not in it)")
            return section.markdown()
        if args.profile:
            section.add(*await cprofile(url, plan, args.profile.split(","), args.profile_out))
            return section.markdown()
        bench = Bench(url, plan, only)
        try:
            await bench.run()
        finally:
            section.add(bench.table(), *bench.blocks)
        return section.markdown()


def cli(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="300 sign-ups per figure")
    parser.add_argument(
        "-n", type=int, default=None, help="sign-ups per throughput figure (the rest scaled)"
    )
    parser.add_argument("--only", default="", help="comma-separated figures, e.g. 1,2")
    parser.add_argument(
        "--profile",
        nargs="?",
        const=",".join(SIGNUP_SERVICES),
        default="",
        help="cProfile the services (comma-separated; default all) during one throughput run",
    )
    parser.add_argument(
        "--py-spy",
        nargs="?",
        const=",".join(SIGNUP_SERVICES),
        default="",
        help="py-spy the services instead (uv run --with py-spy)",
    )
    parser.add_argument(
        "--profile-out", default="", help="keep the profiles (pstats, or py-spy's raw stacks) here"
    )
    parser.add_argument(
        "--in-flight", type=int, default=IN_FLIGHT, help="concurrent POSTs in throughput runs"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="sign-ups/s of figure 3 (default: half the capacity figure 2 measured)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every service, for experiments (repeatable)",
    )
    parser.add_argument("--otlp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smtp-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.otlp_child:
        otlp_child()
        return
    if args.smtp_child:
        smtp_child()
        return
    text = uvloop.run(main(args))  # the services run on uvloop too
    print_section(text, args.write, PROFILE_MARKER if args.profile or args.py_spy else MARKER)


if __name__ == "__main__":
    cli()
