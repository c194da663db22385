"""What every benchmark section is made of: a stamp with versions, CPU columns and tables.

A section is Markdown a benchmark's ``main`` returns, prints, and (``--write FILE``) puts into
a results file between its markers with :func:`bench.common.write_section`. Nothing in it is
typed by hand: the command, commit, time, load, versions and settings come first, then the
tables, each rate with the CPU each process involved spent per unit of work beside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    Clock,
    Sample,
    cpu_by_pid,
    cpu_seconds,
    package_version,
    run_stamp,
    write_section,
)

DISTRIBUTIONS = {
    "aio-pika": "aio-pika",
    "aiormq": "aiormq",
    "sqlalchemy": "SQLAlchemy",
    "sqlmodel": "SQLModel",
    "aiosqlite": "aiosqlite",
    "asyncpg": "asyncpg",
    "uvloop": "uvloop",
    "pydantic": "pydantic",
    "fastapi": "FastAPI",
    "uvicorn": "uvicorn",
    "faststream": "FastStream",
    "jsonschema": "jsonschema",
    "opentelemetry-sdk": "opentelemetry-sdk",
    "aiosmtplib": "aiosmtplib",
    "aiosmtpd": "aiosmtpd",
    "httpx": "httpx",
}


def versions(dists: Iterable[str], servers: Mapping[str, str | None] | None = None) -> str:
    """``Python 3.11.7, aio-pika 10.2.1, ...; RabbitMQ 3.10.8, SQLite 3.40.1; 2 CPUs, Linux...``

    ``dists``: distribution names (see :data:`DISTRIBUTIONS`); ``servers``: name -> version
    (None: not used in this run, left out)."""
    python = [f"Python {platform.python_version()}"]
    python += [f"{DISTRIBUTIONS.get(d, d)} {package_version(d)}" for d in dists]
    shown = [f"{name} {version}" for name, version in (servers or {}).items() if version]
    machine = f"{os.cpu_count()} CPUs, {platform.platform()}"
    return "; ".join(part for part in (", ".join(python), ", ".join(shown), machine) if part)


def sqlite_version() -> str:
    return sqlite3.sqlite_version


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that made a section (``python -m bench.x --quick ...``)."""
    return " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench's command line: described by the first line of its docstring, with
    ``--write FILE`` (put the section into that results file between its markers)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--write", type=Path, help="put the section into this Markdown file")
    return parser


def print_section(text: str, write: Path | None, marker: str) -> None:
    """Print a finished section and, with ``--write FILE``, put it into that file between
    the markers ``<!-- marker:start -->`` and ``<!-- marker:end -->``."""
    print(f"\n{text}", flush=True)
    if write is not None:
        write_section(write, marker, text)
        print(f"\n(written to {write})", flush=True)


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Section:
    """A benchmark's Markdown section: heading, stamp lines, then blocks (tables, notes)."""

    heading: str
    module: str
    versions: str
    settings: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    stamp: str = field(default_factory=run_stamp)
    started: float = field(default_factory=time.perf_counter)
    command: str = ""
    quick: bool = False
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.command = self.command or command_line(self.module)

    def add(self, *blocks: str) -> None:
        self.blocks += blocks

    def markdown(self) -> str:
        seconds = time.perf_counter() - self.started
        lines = [
            self.heading,
            "",
            f"Printed by `bench/{self.module.rsplit('.', 1)[-1]}.py` (its docstring says how it "
            "measures); nothing here is typed by hand.",
            "",
            f"- command: `{self.command}`",
            f"- run: {self.stamp} before, {load_average()} after; {seconds:.0f} s",
            f"- versions: {self.versions}",
            *(f"- {line}" for line in self.settings),
        ]
        if self.quick:
            lines.append("- **`--quick` (or smaller N): a smoke run, not figures to keep**")
        lines += [f"- **!! {problem}**" for problem in self.problems]
        for block in self.blocks:
            lines += ["", block]
        return "\n".join(lines)


# -- CPU ---------------------------------------------------------------------------------------


def us(seconds: float, count: int) -> str:
    """CPU seconds per unit of work as ``123 µs`` (``—`` when nothing was counted)."""
    return f"{seconds / count * 1e6:,.0f} µs" if count and seconds == seconds else "—"


def ms(seconds: float, count: int) -> str:
    """CPU seconds per unit of work as ``1.23 ms``."""
    return f"{seconds / count * 1000:,.2f} ms" if count and seconds == seconds else "—"


def cpu_cell(sample: Sample, *, broker: bool = True, database: bool = False) -> str:
    """The CPU a sample's unit of work cost each process: this (bench) process, the RabbitMQ
    server and (when it took part) the PostgreSQL server, µs each."""
    parts = [f"bench {us(sample.cpu, sample.count)}"]
    if broker:
        parts.append(f"RabbitMQ {us(sample.broker, sample.count)}")
    if database:
        parts.append(f"PostgreSQL {us(sample.database, sample.count)}")
    return ", ".join(parts)


class Meter:
    """CPU of this process (every thread), the RabbitMQ server and the PostgreSQL server
    (every server process: other clients' work included) between :meth:`start` and
    :meth:`stop`. The servers' processes are looked up once at creation (start reads only
    them: cheap inside a measured window) and again at stop (new ones count from zero)."""

    def __init__(self, *, broker: bool = True, database: bool = False) -> None:
        self.comms = [c for c, on in (("beam.smp", broker), ("postgres", database)) if on]
        self.known = {comm: list(cpu_by_pid(comm)) for comm in self.comms}
        self.before: dict[str, dict[int, float]] = {}
        self.cpu = 0.0

    def start(self) -> None:
        self.before = {c: {p: cpu_seconds(p) for p in pids} for c, pids in self.known.items()}
        self.cpu = time.process_time()

    def stop(self, count: int, seconds: float) -> Sample:
        cpu = time.process_time() - self.cpu
        spent = {}
        for comm in self.comms:
            after = cpu_by_pid(comm)
            spent[comm] = sum(t - self.before[comm].get(p, 0.0) for p, t in after.items())
        return Sample(count, seconds, cpu, spent.get("beam.smp", 0.0), spent.get("postgres", 0.0))


class MeteredClock(Clock):
    """A :class:`Clock` whose rate window (first to last completion) also has the CPU of this
    process and the servers over the same span: :attr:`sample`."""

    def __init__(self, n: int, *, database: bool = False) -> None:
        super().__init__(n)
        self.meter = Meter(database=database)
        self.spent: Sample | None = None

    def tick(self) -> None:
        if self.first is None:
            self.meter.start()
        super().tick()
        if self.count == self.n:
            self.spent = self.meter.stop(self.count - 1, self.seconds)

    @property
    def sample(self) -> Sample:
        """``count - 1`` intervals and their CPU (as :attr:`Clock.measured`)."""
        if self.spent is None:  # stopped early (a timeout): what was measured so far
            return self.meter.stop(max(self.count - 1, 0), self.seconds)
        return self.spent


# -- tables -------------------------------------------------------------------------------------


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Row:
    """A figure with its CPU beside it, and what it is compared with (like for like) and
    the baseline's CPU too."""

    figure: str
    value: str
    cpu: str = "—"
    baseline: str = "—"
    baseline_cpu: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "—"}[self.met]


def results_table(rows: Iterable[Row], unit: str = "message", *, cpu: bool = True) -> str:
    """The rows as a Markdown table; ``cpu=False``: without the two CPU columns (figure, value,
    baseline, ratio, target, result), for sections that give the CPU in rows of its own."""
    if not cpu:
        head = ["figure", "value", "baseline", "ratio", "target", "result"]
        return table(
            head, ([r.figure, r.value, r.baseline, r.ratio, r.target, r.verdict] for r in rows)
        )
    head = [
        "figure",
        "value",
        f"CPU per {unit}",
        "compared with (like for like)",
        f"its CPU per {unit}",
        "ratio",
        "target",
        "result",
    ]
    body = [
        [r.figure, r.value, r.cpu, r.baseline, r.baseline_cpu, r.ratio, r.target, r.verdict]
        for r in rows
    ]
    return table(head, body)
