"""``eventctl queue migrate|show`` on a private RabbitMQ node, with messages in flight.

The node runs the management plugin, so both ways of reading queue arguments and bindings
(rabbitmqctl and the HTTP API) are exercised against the same broker. Every test isolates its
queues with a name prefix, so one node serves the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts.events import UserCreatedV2
from tributary.eventctl.admin import ManagementApi, QueueInfo, Rabbitmqctl
from tributary.eventctl.broker import queues_for
from tributary.eventctl.cli import main_async
from tributary.eventctl.migrate import Migration, MigrationBlocked, Target, migrate, plan
from tributary.messaging import headers
from tributary.messaging.bus import Bus
from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.errors import TopologyMismatch
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import isolated_settings
from tributary.messaging.topology import Names, QueueSet
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.nodes import NodeUnavailable, RabbitNode
from tributary.testkit.processes import free_port
from tributary.testkit.waiting import eventually

from .helpers import UserCreated, body_of, publish, user_created

pytestmark = pytest.mark.broker

SERVICE = "mover"
OLD_LIMIT, NEW_LIMIT = 5, 2
OLD_TIERS = (30.0, 60.0)  # long: retried messages are still waiting when the migration runs
NEW_TIERS = (0.2, 0.4, 0.6)  # one tier more, every delay changed
ROUTING_KEY = "user.created.v2"


class ManagedNode(RabbitNode):
    """A private node with the management plugin on its own port."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.management_port = free_port()
        self.management_url = f"http://127.0.0.1:{self.management_port}"

    def _write_files(self) -> None:
        super()._write_files()
        (self.base / "enabled_plugins").write_text("[rabbitmq_management].\n")
        with (self.base / "rabbitmq.conf").open("a") as conf:
            conf.write(
                f"management.tcp.port = {self.management_port}\nmanagement.tcp.ip = 127.0.0.1\n"
            )

    @property
    def cli_env(self) -> dict[str, str]:
        """rabbitmqctl finds the node's Erlang cookie in its HOME."""
        return {**os.environ, "HOME": str(self.base / "home")}

    @property
    def rabbitmqctl(self) -> str:
        return str(self.sbin / "rabbitmqctl")

    def arguments(self) -> dict[str, dict[str, Any]]:
        """Queue name -> arguments, as the broker reports them."""
        out = self.ctl("list_queues", "-q", "--formatter", "json", "name", "arguments").stdout
        return {row["name"]: {a[0]: a[-1] for a in row["arguments"]} for row in json.loads(out)}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedNode]:
    try:
        started = ManagedNode(tmp_path_factory.mktemp("rabbit"))
    except NodeUnavailable as exc:
        pytest.skip(f"no private RabbitMQ node: {exc}")
    try:
        started.start()
        yield started
    finally:
        started.stop()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    made = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mover.db'}")
    await create_runtime_tables(made)
    yield made
    await made.dispose()


@dataclass
class Seen:
    """Every event id the handler was called with."""

    ids: list[str] = field(default_factory=list)

    async def __call__(self, event: UserCreated, uow: UnitOfWork) -> None:
        self.ids.append(event.id)


def old_and_new(node: ManagedNode) -> tuple[MessagingSettings, MessagingSettings]:
    old = isolated_settings(node.url, delivery_limit=OLD_LIMIT, retry_tiers=OLD_TIERS)
    new = isolated_settings(
        node.url, name_prefix=old.name_prefix, delivery_limit=NEW_LIMIT, retry_tiers=NEW_TIERS
    )
    return old, new


async def declare(settings: MessagingSettings, engine: AsyncEngine) -> Bus:
    """Start and stop a bus: the service's queues exist, nobody consumes them."""
    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: Seen()}, settings=settings)
    try:
        await bus.start(consume=False)
    finally:
        await bus.stop()
    return bus


def queues(settings: MessagingSettings) -> QueueSet:
    return Names(settings.name_prefix).service_queues(SERVICE, len(settings.retry_tiers))


async def park_in_retry_tier(settings: MessagingSettings, tier: int, n: int) -> list[str]:
    """Put ``n`` events into retry tier ``tier`` as the consumer does after a failure."""
    events = [user_created() for _ in range(n)]
    retry_queue = queues(settings).retries[tier - 1]
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        for event in events:
            message = _message(event, **{headers.RETRIES: tier, headers.ROUTING_KEY: ROUTING_KEY})
            await channel.default_exchange.publish(message, retry_queue, mandatory=True)
    return [e["id"] for e in events]


async def publish_all(settings: MessagingSettings, n: int) -> list[str]:
    """Publish ``n`` events on the exchange, confirmed, on one channel."""
    events = [user_created() for _ in range(n)]
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(Names(settings.name_prefix).exchange, ensure=False)
        await asyncio.gather(*(exchange.publish(_message(e), ROUTING_KEY) for e in events))
    return [e["id"] for e in events]


def _message(event: dict[str, Any], **headers_: Any) -> aio_pika.Message:
    return aio_pika.Message(
        body_of(event),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/cloudevents+json",
        message_id=event["id"],
        headers=headers_,
    )


@dataclass
class Producer:
    """A live producer: confirmed, mandatory publishes at about 200 a second until stopped."""

    settings: MessagingSettings
    limit: int = 5000  # a bound, in case stop() is never called
    published: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        connection = await aio_pika.connect(self.settings.rabbitmq_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            names = Names(self.settings.name_prefix)
            exchange = await channel.get_exchange(names.exchange, ensure=False)
            while not self._stop.is_set() and len(self.published) < self.limit:
                event = user_created()
                # mandatory: raises if no queue took it
                await exchange.publish(_message(event), ROUTING_KEY, mandatory=True)
                self.published.append(event["id"])
                if len(self.published) % 10 == 0:
                    await asyncio.sleep(0.05)  # pacing (a load shape), not waiting for anything

    def stop(self) -> None:
        self._stop.set()


def moved(output: str, source: str, target: str) -> int:
    """The count eventctl printed for moves ``source -> target``."""
    found = re.findall(
        rf"moved (\d+) message\(s\) {re.escape(source)} -> {re.escape(target)}$", output, re.M
    )
    return sum(int(n) for n in found)


async def drain(url: str, queue: str) -> list[str]:
    """Take every message of ``queue``; their ids."""
    ids: list[str] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            ids.append(str(message.message_id))
    return ids


async def deliveries_until_dead_lettered(settings: MessagingSettings) -> int:
    """Requeue one event until the broker dead-letters it: the delivery limit, by behaviour."""
    qs = queues(settings)
    event = user_created()
    await publish(settings, event)
    deliveries = 0
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        work = await channel.get_queue(qs.work, ensure=False)
        dlq = await channel.get_queue(qs.dlq, ensure=False)
        dead = asyncio.get_running_loop().create_future()

        async def on_dead(message: AbstractIncomingMessage) -> None:
            await message.ack()
            if not dead.done():
                dead.set_result(message.message_id)

        async def crash(message: AbstractIncomingMessage) -> None:
            nonlocal deliveries
            deliveries += 1
            await message.nack(requeue=True)

        await dlq.consume(on_dead)
        await work.consume(crash)
        assert await asyncio.wait_for(dead, 30) == event["id"]
    return deliveries


async def eventctl(node: ManagedNode, settings: MessagingSettings, *argv: str) -> int:
    return await main_async(
        [
            *argv,
            "--url",
            settings.rabbitmq_url,
            "--prefix",
            settings.name_prefix,
            "--rabbitmqctl",
            node.rabbitmqctl,
            "--node",
            node.name,
        ]
    )


async def test_changing_the_delivery_limit_and_the_tiers_with_messages_queued_loses_nothing(
    node: ManagedNode,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HOME", str(node.base / "home"))
    old, new = old_and_new(node)
    await declare(old, engine)
    queued = await publish_all(old, 300)
    retried = await park_in_retry_tier(old, 1, 20) + await park_in_retry_tier(old, 2, 20)

    producer = Producer(old)
    producing = asyncio.create_task(producer.run())
    try:
        code = await eventctl(
            node,
            old,
            "queue",
            "migrate",
            SERVICE,
            "--delivery-limit",
            str(NEW_LIMIT),
            "--retry-tiers",
            ",".join(map(str, NEW_TIERS)),
        )
    finally:
        producer.stop()
        await producing
    out = capsys.readouterr().out
    assert code == 0, out

    qs = queues(new)
    arguments = node.arguments()
    assert arguments[qs.work]["x-delivery-limit"] == NEW_LIMIT
    assert [arguments[q]["x-message-ttl"] for q in qs.retries] == [200, 400, 600]
    assert not [name for name in arguments if "migrat" in name]  # nothing left behind

    # the service starts on the new settings and handles every event, retried ones included
    seen = Seen()
    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: seen}, settings=new)
    everything = {*queued, *retried, *producer.published}
    await bus.start()
    try:

        async def all_handled() -> bool:
            return set(seen.ids) >= everything

        await eventually(all_handled, timeout=60, what=f"{len(everything)} events handled")
    finally:
        await bus.stop()
    # events published while the work queue was replaced waited in the holding queue
    holding = f"{qs.work}.migrating"
    assert moved(out, holding, qs.work) > moved(out, qs.work, holding), out
    assert set(seen.ids) == everything
    assert await drain(node.url, qs.dlq) == []
    assert await deliveries_until_dead_lettered(new) == NEW_LIMIT + 1
    # and the old settings no longer match: a forgotten instance does not start on them
    with pytest.raises(TopologyMismatch, match="eventctl queue migrate mover"):
        await declare(old, engine)


async def test_an_interrupted_migration_blocks_the_service_and_a_rerun_finishes_it(
    node: ManagedNode, engine: AsyncEngine
) -> None:
    old, new = old_and_new(node)
    await declare(old, engine)
    queued = await publish_all(old, 50)
    retried = await park_in_retry_tier(old, 2, 10)
    admin = ManagementApi(node.management_url, "/", credentials_from=node.url)
    target = Target.of(
        Names(old.name_prefix),
        queues_for(SERVICE, old.name_prefix),
        delivery_limit=NEW_LIMIT,
        tier_seconds=NEW_TIERS,
    )

    class Crash(Exception):
        pass

    class CrashesBeforeRedeclaring(Migration):
        async def _empty_and_delete(self, queue: str, holding: str) -> None:
            await self.move(queue, holding)
            raise Crash(queue)  # the process died with the messages in the holding queue

    from tributary.eventctl import migrate as module

    connection = await aio_pika.connect(node.url)
    async with connection:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "Migration", CrashesBeforeRedeclaring)
            with pytest.raises(Crash):
                await migrate(connection, admin, target, say=lambda line: None)
        arrived_meanwhile = user_created()
        await publish(old, arrived_meanwhile)  # routed to the holding queue

        with pytest.raises(TopologyMismatch, match="is being migrated"):
            await declare(new, engine)

        lines: list[str] = []
        await migrate(connection, admin, target, say=lines.append)
    assert any("resuming" in line for line in lines), lines

    qs = queues(new)
    arguments = node.arguments()
    assert arguments[qs.work]["x-delivery-limit"] == NEW_LIMIT
    assert not [name for name in arguments if "migrat" in name]
    in_work = await drain(node.url, qs.work)
    retried_later = []
    for retry_queue in qs.retries:
        retried_later += await drain(node.url, retry_queue)
    # the retried ones may already be back in the work queue: their new delay is short
    found = in_work + retried_later
    assert sorted(set(found)) == sorted({*queued, *retried, arrived_meanwhile["id"]})


async def test_a_migration_refuses_to_run_while_the_service_consumes(
    node: ManagedNode,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HOME", str(node.base / "home"))
    old, _ = old_and_new(node)
    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: Seen()}, settings=old)
    await bus.start()
    try:
        code = await eventctl(node, old, "queue", "migrate", SERVICE, "--delivery-limit", "2")
    finally:
        await bus.stop()
    assert code == 2
    # refused by the plan (rabbitmqctl's consumer count) or, when that count lags, by the
    # passive declare just before the queue would be deleted
    assert "stop every instance of" in capsys.readouterr().err
    assert node.arguments()[queues(old).work]["x-delivery-limit"] == OLD_LIMIT


async def test_show_reads_the_same_arguments_through_rabbitmqctl_and_http(
    node: ManagedNode, engine: AsyncEngine
) -> None:
    old, _ = old_and_new(node)
    await declare(old, engine)
    qs = queues(old)
    rabbitmqctl = Rabbitmqctl("/", executable=node.rabbitmqctl, node=node.name, env=node.cli_env)
    http = ManagementApi(node.management_url, "/", credentials_from=node.url)
    by_ctl, by_http = await rabbitmqctl.queues(), await http.queues()
    for name in (qs.work, *qs.retries, qs.dlq):
        assert by_ctl[name].arguments == by_http[name].arguments
    assert by_ctl[qs.work].arguments["x-delivery-limit"] == OLD_LIMIT
    keys = {(b.exchange, b.routing_key) for b in await rabbitmqctl.bindings(qs.work)}
    assert keys == {(f"{old.name_prefix}tributary.events", "user.created.*")}
    assert keys == {(b.exchange, b.routing_key) for b in await http.bindings(qs.work)}


# -- the plan, from what the broker reports (no broker needed) -------------------------------


def _info(name: str, arguments: dict[str, Any], consumers: int = 0) -> QueueInfo:
    return QueueInfo(name, arguments, messages=0, consumers=consumers, policy="")


def _broker_with(target: Target, **changed: dict[str, Any]) -> dict[str, QueueInfo]:
    """The queues ``target`` wants, as if declared, with ``changed`` arguments merged in."""
    return {
        name: _info(name, {**arguments, **changed.get(name, {})})
        for name, arguments in target.arguments.items()
    }


def test_a_command_queue_with_one_tier_less_removes_only_that_tier() -> None:
    names = Names("p.")
    target = Target.of(
        names, queues_for("email.send", "p."), delivery_limit=10, tier_seconds=(1.0, 10.0)
    )
    assert target.queues.work == "p.email.send"
    assert target.queues.retries == ("p.email.send.retry.1", "p.email.send.retry.2")
    broker = _broker_with(target)
    broker["p.email.send.retry.3"] = _info("p.email.send.retry.3", {"x-message-ttl": 60000})
    p = plan(target, broker)
    assert (p.replace_work, p.replace_retries, p.create_retries) == (False, [], [])
    assert p.remove_retries == ["p.email.send.retry.3"]
    assert p.park == ["p.email.send.retry.3"]  # the others keep flowing


def test_a_changed_work_queue_parks_every_tier_and_nothing_to_do_is_nothing() -> None:
    target = Target.of(
        Names(""), queues_for("audit", ""), delivery_limit=3, tier_seconds=(1.0, 10.0)
    )
    assert not plan(target, _broker_with(target)).needed
    p = plan(target, _broker_with(target, **{"audit.events": {"x-delivery-limit": 10}}))
    assert p.replace_work
    assert p.park == ["audit.retry.1", "audit.retry.2"]
    assert p.differences == ["audit.events: x-delivery-limit 10 -> 3"]


def test_the_plan_refuses_while_a_consumer_is_attached() -> None:
    target = Target.of(Names(""), queues_for("audit", ""), delivery_limit=3, tier_seconds=(1.0,))
    broker = _broker_with(target)
    broker["audit.events"] = _info("audit.events", target.arguments["audit.events"], consumers=2)
    with pytest.raises(MigrationBlocked, match=r"audit.events \(2\)"):
        plan(target, broker)
