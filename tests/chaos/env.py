"""The world a soak runs in: a private broker, a private PostgreSQL (or SQLite files), an SMTP
sink and the four sign-up services as processes, and how each fault is done and undone."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from signal import SIGTERM

from tributary.eventctl.provision import RabbitmqctlDefinitions
from tributary.testkit.nodes import PostgresNode, RabbitNode

from ..stack import SIGNUP_SERVICES, Stack
from .plan import Database, Fault, Profile

Say = Callable[[str], None]


@dataclass
class Injected:
    """A fault as it happened: seconds from the start of the load, and how long it held."""

    fault: Fault
    at: float
    took: float = 0.0
    error: str | None = None

    def row(self) -> str:
        status = f"FAILED: {self.error}" if self.error else "undone"
        return (
            f"#{self.fault.index:<3} t={self.at:7.1f}s  {self.fault.describe():<28} "
            f"hold={self.fault.hold:6.2f}s  took={self.took:6.1f}s  {status}"
        )


@dataclass
class ChaosEnv:
    """Everything a soak started; :meth:`close` removes it all, whatever state it is in."""

    database: Database
    profile: Profile
    workdir: Path
    say: Say
    rabbit: RabbitNode | None = None
    postgres: PostgresNode | None = None
    stack: Stack | None = None
    kills: dict[str, int] = field(default_factory=dict)
    """SIGKILLs per service (the email window: a mail accepted just before a kill is resent)."""
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set by :meth:`close`: a fault being held is undone at once."""
    _faults: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="fault")
    )

    def start(self) -> Stack:
        """Start the nodes, make the databases and start the services (ready when it returns)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.rabbit = RabbitNode(self.workdir)
        self.rabbit.start()
        self.say(f"broker {self.rabbit.name} on {self.rabbit.url} ({self._since(started)})")
        if self.database == "postgres":
            self.postgres = PostgresNode(self.workdir)
            self.postgres.start()
            urls = asyncio.run(self._postgres_databases(self.postgres))
            self.say(f"PostgreSQL on port {self.postgres.port} ({self._since(started)})")
        else:
            urls = {n: f"sqlite+aiosqlite:///{self.workdir / (n + '.db')}" for n in SIGNUP_SERVICES}
        ctl = RabbitmqctlDefinitions(
            executable=str(self.rabbit.sbin / "rabbitmqctl"),
            node=self.rabbit.name,
            env=self.rabbit.ctl_env,
        )
        stack = Stack(
            broker_url=self.rabbit.url, workdir=self.workdir, database_urls=urls, provisioner=ctl
        )
        stack.extra_env.update(
            TRIBUTARY_RETRY_TIERS=str(list(self.profile.retry_tiers)),
            SMTP_TIMEOUT="5",
        )
        self.stack = stack
        stack.mail.start()
        stack.start()
        self.say(f"services ready ({self._since(started)}); logs in {self.workdir}")
        return stack

    @staticmethod
    async def _postgres_databases(node: PostgresNode) -> dict[str, str]:
        """One database per service (the node keeps acknowledged commits across a kill)."""
        token = uuid.uuid4().hex[:6]
        return {n: await node.create_database(f"chaos_{n}_{token}") for n in SIGNUP_SERVICES}

    @staticmethod
    def _since(started: float) -> str:
        return f"{time.monotonic() - started:.1f} s"

    def close(self) -> None:
        """Undo a fault in progress, then stop services, SMTP sink and nodes; never raises, so
        it belongs in ``finally`` (also after Ctrl-C)."""
        self.stopping.set()
        steps: list[tuple[str, Callable[[], object]]] = [
            ("finish the fault in progress", lambda: self._faults.shutdown(wait=True))
        ]
        if self.stack is not None:
            services = self.stack.services
            # SIGTERM to all first, so they wind down together rather than one after another
            steps += [(f"signal {n}", partial(p.signal, SIGTERM)) for n, p in services.items()]
            steps += [(f"stop {n}", p.stop) for n, p in services.items()]
            steps.append(("stop the SMTP sink", self.stack.mail.stop))
        if self.rabbit is not None:
            steps.append(("stop the broker", self.rabbit.stop))  # keeps its log in the workdir
        if self.postgres is not None:
            steps.append(("remove PostgreSQL", self.postgres.destroy))
        for what, step in steps:
            begun = time.monotonic()
            try:
                step()
            except BaseException as exc:  # cleanup goes on whatever happened
                self.say(f"cleanup: {what} failed: {type(exc).__name__}: {exc}")
            if (took := time.monotonic() - begun) > 5:
                self.say(f"cleanup: {what} took {took:.0f} s")

    # -- faults ---------------------------------------------------------------------------------

    async def inject(self, fault: Fault) -> None:
        """Run :meth:`inject_now` on the fault thread (which :meth:`close` waits for)."""
        await asyncio.get_running_loop().run_in_executor(self._faults, self.inject_now, fault)

    def inject_now(self, fault: Fault) -> None:
        """Do ``fault``, hold it (cut short by :meth:`close`), and undo it in ``finally``.

        Returns once the fault is undone and, for a restarted service, the service is ready.
        """
        assert self.stack is not None
        assert self.rabbit is not None
        stop = self.stopping
        stack, rabbit = self.stack, self.rabbit
        if fault.kind in ("kill", "term"):
            process = stack.services[fault.target]
            try:
                if fault.kind == "kill":
                    process.kill()
                    self.kills[fault.target] = self.kills.get(fault.target, 0) + 1
                else:
                    process.stop(timeout=30)
                stop.wait(fault.hold)
            finally:
                stack.restart(fault.target)
        elif fault.kind == "broker_restart":
            try:
                rabbit.stop_app()
                stop.wait(fault.hold)
            finally:
                rabbit.start_app()
        elif fault.kind == "broker_close":
            rabbit.close_all_connections()
        elif fault.kind == "db_outage":
            assert self.postgres is not None
            postgres = self.postgres
            try:
                postgres.kill() if fault.how == "kill" else postgres.stop()
                stop.wait(fault.hold)
            finally:
                postgres.start()
        elif fault.kind == "smtp_pause":
            try:
                stack.mail.stop()
                stop.wait(fault.hold)
            finally:
                stack.mail.start()

    def ensure_running(self) -> list[str]:
        """Start any service that is not running (after a failed undo); names restarted."""
        assert self.stack is not None
        restarted = []
        for name, process in self.stack.services.items():
            if process.process is None or process.process.poll() is not None:
                with contextlib.suppress(Exception):
                    process.stop()
                self.stack.restart(name)
                restarted.append(name)
        return restarted
