"""One soak: start the world, run the load while the driver injects the seeded faults, wait for
quiescence, check the invariants, report; everything is removed again whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tributary.email.settings import DEFAULT_CONCURRENCY

from ..stack import SIGNUP_SERVICES, Stack
from .check import Checker, Findings
from .env import ChaosEnv, Injected, Say
from .load import LoadGenerator, LoadResult, make_signups
from .plan import (
    KINDS,
    Database,
    Fault,
    FaultKind,
    Profile,
    fault_count,
    kinds_for,
    make_plan,
    pace,
)


@dataclass(frozen=True)
class Config:
    database: Database
    seed: int
    profile: Profile
    signups: int
    faults: int
    kinds: tuple[FaultKind, ...]
    workdir: Path

    @classmethod
    def of(
        cls,
        database: Database,
        seed: int,
        profile: Profile,
        workdir: Path,
        *,
        signups: int | None = None,
        faults: int | None = None,
        kinds: tuple[FaultKind, ...] | None = None,
    ) -> Config:
        """A run of ``profile`` on ``database``; the overrides default to the profile's."""
        count = signups or profile.signups
        usable = tuple(k for k in kinds or KINDS if k in kinds_for(database))
        return cls(
            database=database,
            seed=seed,
            profile=profile,
            signups=count,
            faults=faults if faults is not None else fault_count(profile, count, usable),
            kinds=usable,
            workdir=workdir,
        )

    def plan(self) -> list[Fault]:
        return make_plan(self.seed, self.profile, self.kinds, self.faults)

    def rerun(self) -> str:
        kinds = ",".join(self.kinds)
        args = (
            f"--database {self.database} --profile {self.profile.name} --signups {self.signups} "
            f"--faults {self.faults} --kinds {kinds} --seed {self.seed}"
        )
        return (
            f"make chaos DB={self.database} PROFILE={self.profile.name} SIGNUPS={self.signups} "
            f"FAULTS={self.faults} KINDS={kinds} SEED={self.seed}\n"
            f"  (or: .venv/bin/python -m tests.chaos {args})"
        )


@dataclass
class Outcome:
    config: Config
    injected: list[Injected] = field(default_factory=list)
    load: LoadResult | None = None
    quiescent_after: float | None = None
    findings: Findings = field(default_factory=Findings)
    seconds: float = 0.0
    log_excerpts: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.findings.ok
            and self.load is not None
            and not self.load.pending
            and self.quiescent_after is not None
            and not any(i.error for i in self.injected)
        )

    def report(self) -> str:
        c = self.config
        lines = [
            f"chaos soak: {c.database}, seed {c.seed}, profile {c.profile.name}, "
            f"{c.signups} sign-ups, {c.faults} faults, {self.seconds:.0f} s",
            "faults injected (t = seconds since the load started):",
            *(f"  {i.row()}" for i in self.injected),
        ]
        kinds = Counter(i.fault.kind for i in self.injected if not i.error)
        lines.append("  survived: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
        if self.load is not None:
            lines.append(f"load: {self.load.summary()}")
            refused = [f"{s.key}: {s.refused}" for s in self.load.signups if s.refused]
            if refused:
                lines.append(f"  refused: {refused[:5]}")
            if self.load.pending:
                lines.append(f"  never accepted: {len(self.load.pending)}")
        settled = "never" if self.quiescent_after is None else f"{self.quiescent_after:.1f} s"
        lines.append(f"quiescent after the last fault and sign-up: {settled}")
        lines.append("counts: " + ", ".join(f"{k} {v}" for k, v in self.findings.counts.items()))
        lines += [f"note: {n}" for n in self.findings.notes]
        lines.append(f"result: {'OK' if self.ok else 'FAILED'}")
        if not self.ok:
            lines += [f"problem: {p}" for p in self.findings.problems]
            lines.append(f"logs: {c.workdir}")
            lines.append(f"re-run this seed: {c.rerun()}")
            if self.log_excerpts:
                lines.append(self.log_excerpts)
        return "\n".join(lines)


def run(config: Config, say: Say) -> Outcome:
    """The whole soak; the nodes and processes it started are gone when it returns or raises."""
    outcome = Outcome(config)
    plan = config.plan()
    say(
        f"chaos soak on {config.database}, seed {config.seed}: {config.signups} sign-ups, "
        f"plan: " + "; ".join(f"{f.describe()} {f.hold:.1f}s" for f in plan)
    )
    started = time.monotonic()
    env = ChaosEnv(config.database, config.profile, config.workdir, say)
    try:
        stack = env.start()
        asyncio.run(_soak(env, stack, plan, outcome, say))
    finally:
        if not outcome.ok and env.stack is not None:
            outcome.log_excerpts = log_excerpts(env.stack)
        env.close()
        outcome.seconds = time.monotonic() - started
        with contextlib.suppress(OSError):
            (config.workdir / "report.txt").write_text(outcome.report() + "\n")
    return outcome


async def _soak(env: ChaosEnv, stack: Stack, plan: list[Fault], out: Outcome, say: Say) -> None:
    config = out.config
    profile = config.profile
    signups = make_signups(config.signups, uuid.uuid4().hex[:6])
    rate = pace(profile, config.signups, plan)
    say(f"load: {config.signups} sign-ups at {rate:.1f}/s, at most {profile.concurrency} at once")
    load = LoadGenerator(stack.url("identity"), signups, rate=rate, concurrency=profile.concurrency)
    out.load = load.result
    started = time.monotonic()
    load_task = asyncio.create_task(load.run())
    progress = asyncio.create_task(_progress(load, stack, out, started, say))
    try:
        await _drive(env, plan, out, started, say)
        try:  # after a fault that could not be undone: every service runs for the checks
            if restarted := await asyncio.to_thread(env.ensure_running):
                out.findings.problems.append(f"not running after the faults: {restarted}")
        except Exception as exc:
            out.findings.problems.append(f"a service does not start: {exc}"[:2000])
        # the faults are over: the rest of the load gets a bounded time (then it is cancelled)
        await asyncio.wait([load_task], timeout=profile.load_timeout)
    finally:
        load_task.cancel()
        progress.cancel()
        await asyncio.gather(load_task, progress, return_exceptions=True)
    assert env.rabbit is not None
    checker = Checker(stack, env.rabbit.queues)
    try:
        await _settle_and_check(checker, env, out, say)
    finally:
        await checker.aclose()


async def _settle_and_check(checker: Checker, env: ChaosEnv, out: Outcome, say: Say) -> None:
    assert out.load is not None
    timeout = out.config.profile.quiesce_timeout
    say(f"load done: {out.load.summary()}; waiting for quiescence")
    settle = time.monotonic()
    if await checker.quiesce(timeout, say):
        out.quiescent_after = time.monotonic() - settle
    else:
        out.findings.problems.append(f"not quiescent after {timeout:.0f} s")
    say("checking the invariants")
    outages = sum(1 for i in out.injected if i.fault.kind == "db_outage")
    # a SIGKILL of email can catch every mail in flight (one per worker of its events queue)
    # between "accepted by SMTP" and "marked sent"; a database outage one each
    kills = env.kills.get("email", 0) * DEFAULT_CONCURRENCY
    found = await checker.check(out.load.accepted, kills + outages)
    out.findings.counts.update(found.counts)
    out.findings.problems += found.problems
    out.findings.notes += found.notes


async def _drive(env: ChaosEnv, plan: list[Fault], out: Outcome, started: float, say: Say) -> None:
    """Inject the planned faults one after another; stop at the first that cannot be undone."""
    for fault in plan:
        await asyncio.sleep(fault.gap)  # the planned pause between faults, not a wait on an outcome
        record = Injected(fault, at=time.monotonic() - started)
        out.injected.append(record)
        say(f"  fault #{fault.index} t={record.at:.1f}s: {fault.describe()}, hold {fault.hold} s")
        begun = time.monotonic()
        try:
            await env.inject(fault)
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:400]
            say(f"  fault #{fault.index} could not be undone: {record.error}")
            return
        finally:
            record.took = time.monotonic() - begun


async def _progress(
    load: LoadGenerator, stack: Stack, out: Outcome, started: float, say: Say
) -> None:
    while True:
        await asyncio.sleep(out.config.profile.progress_every)
        elapsed = time.monotonic() - started
        say(
            f"  t={elapsed:5.0f}s accepted {load.done}/{len(load.result.signups)}, "
            f"mails {len(stack.mail.messages)}, faults {len(out.injected)}"
        )


def log_excerpts(stack: Stack, per_service: int = 12) -> str:
    """Counts of WARNING/ERROR lines per service and the last few of them, for a failure report."""
    parts = ["service log excerpts (last warnings and errors):"]
    for name in SIGNUP_SERVICES:
        process = stack.services.get(name)
        if process is None:
            continue
        levels: Counter[str] = Counter()
        picked: list[str] = []
        for line in process.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    picked.append(line[:300])
                continue
            level = str(record.get("level", "")).upper()
            levels[level] += 1
            if level in ("WARNING", "ERROR", "CRITICAL"):
                fields = ("time", "level", "logger", "message", "outcome", "reason", "event_type")
                picked.append(" ".join(str(record[f]) for f in fields if f in record)[:300])
        parts.append(f"--- {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(levels.items())))
        parts += [f"    {line}" for line in picked[-per_service:]]
    return "\n".join(parts)
