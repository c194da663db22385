"""Email service throughput: mails/s fully sent (at the SMTP sink) by the real email process.

The real email service (``python -m tributary.email``, its own database, migrations and all)
takes N ``email.send.v1`` commands published through the broker and sends them to an SMTP sink
(aiosmtpd, ``tests.stack.MailSink``) running in a child process of its own. The rate is taken
from the first mail to the last one at the sink. CPU per mail is read from ``/proc`` for the
email process and the sink; the raw baseline sends the same number of mails, same sizes, with
a bare aiosmtplib pool (``tributary.email.mailer.Mailer``: the same pooled connections, as many
at once as the service) straight to the sink, in the same run. ratio = service / raw.

    python -m bench.email_bench --quick                 # SQLite and PostgreSQL, N=1,000
    python -m bench.email_bench --db sqlite -n 5000 --concurrency 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import aio_pika
from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.common import (
    DB_LABEL,
    Databases,
    DbKind,
    SinkProcess,
    cpu_seconds,
    database_kinds,
    package_version,
    rabbitmq_version,
    run_stamp,
    serve_sink,
)
from bench.report import bench_parser, print_section
from tests.stack import queue_names
from tributary.contracts.envelope import new_event
from tributary.contracts.events import EmailSendV1
from tributary.email.mailer import Mailer
from tributary.email.settings import DEFAULT_CONCURRENCY, Settings
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import delete_prefixed
from tributary.messaging.topology import Names
from tributary.testkit.infra import find_postgres, find_rabbitmq
from tributary.testkit.processes import ServiceProcess, free_port, service_env

MARKER = "email-bench"
WARM_UP = 50
COMMAND = "email.send.v1"


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the SMTP sink, in a child process ------------------------------------------------------


class SinkChild(SinkProcess):
    """The SMTP sink, in a child process: for every mail it accepts it reports the arrival
    time, the client port (one per connection) and the Message-ID on its stdout."""

    def __init__(self) -> None:
        super().__init__("bench.email_bench")
        self.arrivals: list[tuple[float, int, str]] = []
        self._changed = asyncio.Event()

    def on_line(self, line: str) -> None:
        when, peer, message_id = line.split()
        self.arrivals.append((float(when), int(peer), message_id))
        self._changed.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count:
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.arrivals)} of {count} mails at the sink")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


def smtp_child() -> None:
    from tests.stack import MailSink

    class Sink(MailSink):
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            reply = await super().handle_DATA(server, session, envelope)
            now = time.time()
            message = self.messages.pop()  # only the arrival is reported: memory stays flat
            peer = session.peer[1] if isinstance(session.peer, tuple) else 0
            print(f"{now:.6f} {peer} {message.get('Message-ID', '-')}", flush=True)
            return reply

    serve_sink(Sink())


# -- workload --------------------------------------------------------------------------------


def commands(n: int, tag: str) -> list[bytes]:
    """``n`` distinct email.send commands (each its own logical email)."""
    bodies: list[bytes] = []
    for i in range(n):
        event = new_event(
            routing_key=COMMAND,
            source="/services/notification",
            data=EmailSendV1(
                request_id=uuid.uuid4(),
                to=f"reader{i}.{tag}@example.com",
                template="notification",
                subject="Grace mentioned you",
                variables={"given_name": "Ada", "text": "Look at this", "url": "https://x.test/1"},
            ),
        )
        bodies.append(event.to_bytes())
    return bodies


def raw_message(i: int, tag: str) -> EmailMessage:
    """What the service sends for one command, near enough in size and shape."""
    message = EmailMessage()
    message["From"] = "Tributary <no-reply@tributary.dev>"
    message["To"] = f"raw{i}.{tag}@example.com"
    message["Subject"] = "Grace mentioned you"
    message["Message-ID"] = f"<{uuid.uuid4().hex}@tributary.dev>"
    message["Content-Language"] = "en-GB"
    message.set_content("Hello Ada,\n\nGrace mentioned you: Look at this\nhttps://x.test/1\n")
    return message


async def publish(url: str, names: Names, bodies: Sequence[bytes], in_flight: int = 256) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.exchange, ensure=False)
        limit = asyncio.Semaphore(in_flight)

        async def one(body: bytes) -> None:
            async with limit:
                await exchange.publish(
                    aio_pika.Message(
                        body,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        content_type="application/cloudevents+json",
                        user_id="guest",
                    ),
                    COMMAND,
                    mandatory=True,
                )

        await asyncio.gather(*(one(b) for b in bodies))
    finally:
        await connection.close()


def probe(names: Names) -> str:
    return f"{names.prefix}bench.probe"


async def bind_probe(url: str, names: Names) -> None:
    """A queue taking what the email service emits (email.sent...), as audit and notification
    would: without one the relay finds its events unroutable and keeps retrying them."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            probe(names), durable=True, arguments={"x-max-length": 1000}
        )
        await queue.bind(names.exchange, "email.#")
    finally:
        await connection.close()


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Figure:
    label: str
    n: int
    seconds: float
    """First to last mail at the sink (``n - 1`` intervals)."""
    sender_cpu: float
    """CPU seconds of the sending process (the email service, or this one for raw)."""
    sink_cpu: float
    connections: int
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return (self.n - 1) / self.seconds if self.seconds > 0 else float("nan")

    def per_mail_us(self, cpu: float) -> float:
        return cpu / self.n * 1e6


async def measure_service(
    broker: str, database_url: str, concurrency: int, n: int, workdir: Path
) -> Figure:
    """A fresh email process on ``database_url``: warm-up, then ``n`` commands timed."""
    names = Names(f"eb{uuid.uuid4().hex[:8]}.")
    sink = SinkChild()
    await sink.start()
    port = free_port()
    env = service_env(
        {
            "RABBITMQ_URL": broker,
            "TRIBUTARY_NAME_PREFIX": names.prefix,
            "EMAIL_DATABASE_URL": database_url,
            "EMAIL_PORT": str(port),
            "EMAIL_CONCURRENCY": str(concurrency),
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink.port),
            "LOG_LEVEL": "WARNING",
            "OTEL_SDK_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    service = ServiceProcess("email", port, env, workdir / f"email-{names.prefix}log")
    service.start()
    try:
        await asyncio.to_thread(service.wait_ready)
        await bind_probe(broker, names)
        tag = names.prefix.rstrip(".")
        await publish(broker, names, commands(WARM_UP, f"w{tag}"))
        await sink.wait_for(WARM_UP, 120)
        assert service.process is not None
        pid = service.process.pid
        before = (cpu_seconds(pid), cpu_seconds(sink.pid), len(sink.arrivals))
        await publish(broker, names, commands(n, tag))
        await sink.wait_for(WARM_UP + n, 600)
        cpu = cpu_seconds(pid) - before[0]
        sink_cpu = cpu_seconds(sink.pid) - before[1]
        timed = sink.arrivals[before[2] :]
        seen = [m for _, _, m in sink.arrivals]
        problems = [f"{len(seen) - len(set(seen))} duplicate Message-ID(s)"] * (
            len(seen) != len(set(seen))
        )
        return Figure(
            f"service, concurrency {concurrency}",
            n,
            timed[-1][0] - timed[0][0],
            cpu,
            sink_cpu,
            len({p for _, p, _ in timed}),
            problems,
        )
    finally:
        await asyncio.to_thread(service.stop)
        await sink.stop()
        # every queue the service declared: its event and command queue sets, tiers and DLQs
        tiers = len(MessagingSettings().retry_tiers)
        queues = [*queue_names(names.prefix, tiers, ("email",)), probe(names)]
        with contextlib.suppress(Exception):
            await delete_prefixed(broker, names, queues)


async def measure_raw(n: int, concurrency: int, connections: int) -> Figure:
    """``n`` mails through a bare pool of ``connections``, ``concurrency`` at once."""
    sink = SinkChild()
    await sink.start()
    mailer = Mailer("127.0.0.1", sink.port, timeout=10, connections=connections)
    try:
        tag = uuid.uuid4().hex[:8]
        limit = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with limit:
                await mailer.send(raw_message(i, tag))

        await asyncio.gather(*(one(i) for i in range(WARM_UP)))
        await sink.wait_for(WARM_UP, 60)
        before = (time.process_time(), cpu_seconds(sink.pid), len(sink.arrivals))
        await asyncio.gather(*(one(i) for i in range(n)))
        await sink.wait_for(WARM_UP + n, 300)
        cpu = time.process_time() - before[0]
        timed = sink.arrivals[before[2] :]
        return Figure(
            f"raw aiosmtplib pool, {concurrency} at once",
            n,
            timed[-1][0] - timed[0][0],
            cpu,
            cpu_seconds(sink.pid) - before[1],
            len({p for _, p, _ in timed}),
        )
    finally:
        await mailer.close()
        await sink.stop()


# -- the run ---------------------------------------------------------------------------------


@asynccontextmanager
async def infrastructure(kinds: list[DbKind]) -> AsyncIterator[tuple[str, Databases]]:
    with ExitStack() as infra:
        broker = find_rabbitmq(infra).url
        pg = find_postgres(infra).url if "postgres" in kinds else ""
        with tempfile.TemporaryDirectory(prefix="tributary-email-bench-") as tmp:
            yield broker, Databases(pg, Path(tmp))


def table(rows: list[tuple[str, Figure, Figure]]) -> str:
    lines = [
        "| database | sender | mails/s at the sink | sender CPU/mail | sink CPU/mail "
        "| SMTP connections | ratio service/raw |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for db, figure, raw in rows:
        ratio = "" if figure is raw else f"{figure.rate / raw.rate:.2f}"
        problems = f" !! {'; '.join(figure.problems)}" if figure.problems else ""
        lines.append(
            f"| {db} | {figure.label}{problems} | {figure.rate:,.0f} "
            f"| {figure.per_mail_us(figure.sender_cpu):,.0f} µs "
            f"| {figure.per_mail_us(figure.sink_cpu):,.0f} µs | {figure.connections} | {ratio} |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> str:
    n = 1_000 if args.quick else args.n
    kinds = database_kinds(args.db)
    levels = [int(c) for c in args.concurrency.split(",")]
    connections = Settings().smtp_connections
    command = " ".join(["python", "-m", "bench.email_bench", *sys.argv[1:]])
    stamp = run_stamp()
    started = time.perf_counter()
    rabbit = ""
    say(command)
    say(stamp)
    say(f"N = {n:,} email.send commands per run (after {WARM_UP} to warm up)")
    rows: list[tuple[str, Figure, Figure]] = []
    async with infrastructure(kinds) as (broker, dbs):
        rabbit = await rabbitmq_version(broker)
        for kind in kinds:
            for level in levels:
                async with dbs.fresh_url(kind) as url:
                    figure = await measure_service(broker, url, level, n, dbs.tmp)
                raw = await measure_raw(n, level, connections)
                say(
                    f"  {DB_LABEL[kind]}, concurrency {level}: service {figure.rate:,.0f}/s, "
                    f"raw {raw.rate:,.0f}/s"
                )
                rows.append((DB_LABEL[kind], figure, raw))
                rows.append((DB_LABEL[kind], raw, raw))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    v = package_version
    return "\n".join(
        [
            "## Email service: mails fully sent",
            "",
            "Printed by `bench/email_bench.py` (its docstring says how it measures); "
            "nothing here is typed by hand.",
            "",
            f"- command: `{command}`",
            f"- run: {stamp} before, load average {load} after; "
            f"{time.perf_counter() - started:.0f} s",
            f"- versions: Python {platform.python_version()}, aiosmtplib {v('aiosmtplib')}, "
            f"aiosmtpd {v('aiosmtpd')}, SQLAlchemy {v('sqlalchemy')}, aiosqlite "
            f"{v('aiosqlite')}, asyncpg {v('asyncpg')}, uvloop {v('uvloop')}; RabbitMQ "
            f"{rabbit}, SQLite {sqlite3.sqlite_version}; "
            f"{os.cpu_count()} CPUs",
            f"- workload: N = {n:,} `email.send.v1` commands per row (after {WARM_UP} to warm "
            "up), published through the broker to the real email process (`python -m "
            f"tributary.email`, a fresh database); {connections} pooled SMTP connections "
            f"(`EMAIL_SMTP_CONNECTIONS`); the service's default concurrency is "
            f"{DEFAULT_CONCURRENCY} (`EMAIL_CONCURRENCY`)",
            "- time: first to last mail at the sink (aiosmtpd in a child process); CPU per mail "
            "from /proc (user + system) of the sending process and of the sink",
            "- baseline (raw): as many mails over the same pool (`Mailer`), as many at once, "
            "from this process straight to a fresh sink, nothing else; ratio = service / raw",
            "",
            table(rows),
        ]
    )


def cli(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--smtp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="N=1,000: a smoke run")
    parser.add_argument("-n", type=int, default=5_000, help="mails per run")
    parser.add_argument("--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument(
        "--concurrency",
        default=f"1,{DEFAULT_CONCURRENCY}",
        help="comma-separated EMAIL_CONCURRENCY values to run",
    )
    args = parser.parse_args(argv)
    if args.smtp_child:
        smtp_child()
        return
    print_section(asyncio.run(main(args)), args.write, MARKER)


if __name__ == "__main__":
    cli()
