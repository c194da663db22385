"""Per-entity ordering across replicas: 10,000 interleaved updates of 100 users, three replicas of
the consumer in their own processes, one SIGKILLed midway.

Partitioned (``ordering`` has 3 partition queues, single-active-consumer): every update is
applied once, in its user's order, and each user ends with the address of its last update.
Unpartitioned (one work queue, the replicas compete): the handler checks the ``sequence``
extension; stale updates are skipped, early ones parked in the retry tiers; every update is
applied once, in order, and each user ends with the address of its last update.

The producer is the real runtime: ``identity``'s outbox and relay, the catalog (a copy with
``ordering`` added as a consumer of ``user.email_changed``) deciding the routing.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts import catalog as catalog_module
from tributary.contracts.events import UserEmailChangedV1
from tributary.messaging.bus import Bus
from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.testing import (
    delete_prefixed,
    isolated_settings,
    partitioned_contracts,
    queue_depth,
    started_bus,
)
from tributary.messaging.topology import Names
from tributary.testkit.infra import Found, fresh_database
from tributary.testkit.waiting import eventually

WORKER = Path(__file__).with_name("ordering_worker.py")
ENTITIES = 100
UPDATES = 100  # per entity: 10,000 in all
REPLICAS = 3
PARTITIONS = 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """The consumer's PostgreSQL database (its replicas share it), with the test's tables."""
    from ordering_worker import TABLES

    async with fresh_database(request, "postgres", tmp_path, "ordering") as url:
        engine = create_engine(url)
        await create_runtime_tables(engine)
        async with engine.begin() as conn:
            for statement in TABLES:
                await conn.execute(text(statement))
        yield engine
        await engine.dispose()


@pytest.fixture(autouse=True)
def _worker_importable() -> Iterator[None]:
    sys.path.insert(0, str(WORKER.parent))
    yield
    sys.path.remove(str(WORKER.parent))


def _contracts(root: Path, *, partitioned: bool, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A catalog copy where ``ordering`` consumes ``user.email_changed``, used by this process
    (cache cleared) and by the replicas (the environment)."""
    contracts = partitioned_contracts(
        root,
        consumers={"user.email_changed": ["ordering"]},
        partitions={"ordering": PARTITIONS} if partitioned else {},
        slots=12,
    )
    monkeypatch.setenv("TRIBUTARY_CONTRACTS_DIR", str(contracts))
    catalog_module.catalog.cache_clear()
    return contracts


async def _replica(url: str, broker: str, prefix: str, name: str, mode: str) -> Replica:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        *("--db", url, "--broker", broker, "--prefix", prefix),
        *("--replica", name, "--mode", mode),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ),
    )
    return Replica(name, process)


class Replica:
    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self.ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if line == "READY":
                self.ready.set()

    def output(self) -> str:
        return f"replica {self.name} (last lines):\n" + "\n".join(self.lines[-20:])

    async def stop(self, sig: int) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await self._reader
        return code


def _update(step: int, user: str) -> UserEmailChangedV1:
    return UserEmailChangedV1(
        user_id=user,
        old_email=f"{user}.{step - 1}@example.com",
        new_email=f"{user}.{step}@example.com",
        changed_at=datetime.now(UTC),
    )


async def _scalar(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar_one())


@pytest.mark.parametrize("mode", ["partitioned", "sequence"])
async def test_updates_of_each_entity_are_applied_once_in_order_across_replicas(
    mode: str,
    database: AsyncEngine,
    rabbitmq: Found,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ordering_worker import TIERS

    started = time.monotonic()
    _contracts(tmp_path / "contracts", partitioned=mode == "partitioned", monkeypatch=monkeypatch)
    settings = isolated_settings(rabbitmq.url)
    prefix = settings.name_prefix
    users = [f"usr_order{n:05d}" for n in range(ENTITIES)]
    async with database.begin() as conn:
        for user in users:
            await conn.execute(
                text("INSERT INTO ordering_entities VALUES (:u, :e, 0)"),
                {"u": user, "e": f"{user}.0@example.com"},
            )
    url = database.url.render_as_string(hide_password=False)
    # the consumer's queues, as its replicas declare them (for the clean-up)
    queues = Bus(
        "ordering",
        database,
        handlers={UserEmailChangedV1: lambda event, uow: asyncio.sleep(0)},
        settings=isolated_settings(rabbitmq.url, name_prefix=prefix, retry_tiers=TIERS),
    ).queue_names()
    producer_engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'identity.db'}")
    await create_runtime_tables(producer_engine)
    replicas: list[Replica] = []
    produce: asyncio.Task[float] | None = None
    try:
        replicas = [
            await _replica(url, rabbitmq.url, prefix, f"r{n}", mode) for n in range(REPLICAS)
        ]
        for replica in replicas:
            await asyncio.wait_for(replica.ready.wait(), 60)
        producer = Bus("identity", producer_engine, settings=settings)
        async with started_bus(producer):
            produce = asyncio.create_task(_produce(producer, users))
            # midway, SIGKILL the replica that applied the latest update (one that is active)
            await eventually(
                lambda: _has(database, "SELECT count(*) FROM ordering_applied", 5000),
                timeout=180,  # upper bounds for a busy machine: each wait ends when done
                what="half of the updates applied",
            )
            async with database.connect() as conn:
                victim_name = (
                    await conn.execute(
                        text("SELECT replica FROM ordering_applied ORDER BY id DESC LIMIT 1")
                    )
                ).scalar_one()
            victim = next(r for r in replicas if r.name == victim_name)
            await victim.stop(9)  # SIGKILL: no ack, no stop, no clean-up
            killed_at = await _scalar(database, "SELECT count(*) FROM ordering_applied")
            produced = await produce - started
            try:
                await eventually(
                    lambda: _has(
                        database, "SELECT count(DISTINCT event_id) FROM ordering_applied", 10_000
                    ),
                    timeout=240,
                    what="every update applied",
                )
            except TimeoutError:
                applied = await _scalar(database, "SELECT count(*) FROM ordering_applied")
                depths = {q: await queue_depth(rabbitmq.url, q) for q in queues}
                logs = "\n".join(r.output() for r in replicas if r is not victim)
                raise AssertionError(f"{applied} applied; queues {depths}\n{logs}") from None
        survivors = [r for r in replicas if r is not victim]
        for replica in survivors:
            assert await replica.stop(15) == 0, replica.output()
        stats = [line for r in survivors for line in r.lines if line.startswith("STATS")]
        # every update applied exactly once
        assert await _scalar(database, "SELECT count(*) FROM ordering_applied") == 10_000
        # in its user's order: each applied right after the one before it
        out_of_order = await _scalar(
            database, "SELECT count(*) FROM ordering_applied WHERE NOT in_order"
        )
        assert out_of_order == 0
        # each user ends with the address of its last update
        async with database.connect() as conn:
            final = dict(
                (await conn.execute(text("SELECT user_id, email FROM ordering_entities"))).all()
            )
            by_replica = dict(
                (
                    await conn.execute(
                        text("SELECT replica, count(*) FROM ordering_applied GROUP BY replica")
                    )
                ).all()
            )
        assert final == {user: f"{user}.{UPDATES}@example.com" for user in users}
        # the killed replica had work, and the others finished it
        assert by_replica.get(victim.name, 0) > 0
        assert sum(by_replica.values()) - killed_at > 0
        dlq = next(q for q in queues if q.endswith(".dlq"))
        assert await queue_depth(rabbitmq.url, dlq) == 0
        print(
            f"\n{mode}: 10,000 updates in {time.monotonic() - started:.1f} s (written to the "
            f"outbox by {produced:.1f} s), applied by "
            f"replica {by_replica}, {victim.name} SIGKILLed after {killed_at}; survivors: {stats}"
        )
    finally:
        if produce is not None and not produce.done():
            produce.cancel()
            await asyncio.gather(produce, return_exceptions=True)
        for replica in replicas:
            if replica.process.returncode is None:
                await replica.stop(9)
        await producer_engine.dispose()
        await delete_prefixed(rabbitmq.url, Names(prefix), queues)
        monkeypatch.undo()
        catalog_module.catalog.cache_clear()


async def _produce(producer: Bus, users: list[str]) -> float:
    """100 rounds; in each, every user's next update, the users in a fresh order. Returns when
    the last is in the outbox (``time.monotonic()``)."""
    rng = random.Random(19)
    for step in range(1, UPDATES + 1):
        async with producer.unit_of_work() as uow:
            for user in rng.sample(users, len(users)):
                uow.outbox.add(_update(step, user), subject=f"users/{user}", sequence=step)
            await uow.commit()
    return time.monotonic()


async def _has(engine: AsyncEngine, sql: str, at_least: int) -> bool:
    return await _scalar(engine, sql) >= at_least
