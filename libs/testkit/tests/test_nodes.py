"""Private RabbitMQ and PostgreSQL nodes: they serve, take faults, and leave the system ones be."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tributary.testkit.nodes import PostgresNode, RabbitCluster, RabbitNode, pids_mentioning
from tributary.testkit.waiting import eventually, wait_until

SYSTEM_PORTS = (5672, 5432)


def _listener_pids(port: int) -> set[str]:
    """Pids listening on 127.0.0.1:``port`` (from ``ss``), to tell a restarted server."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return {part.split("=")[1] for part in out.replace(",", " ").split() if part.startswith("pid=")}


@pytest.fixture(autouse=True)
def system_servers_untouched() -> Iterator[None]:
    """Whatever a test does to its private node, the machine's servers keep running as they were."""
    if shutil.which("ss") is None:
        yield
        return
    before = {port: _listener_pids(port) for port in SYSTEM_PORTS}
    yield
    assert {port: _listener_pids(port) for port in SYSTEM_PORTS} == before


def _persistent(body: bytes) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def _publish_one(url: str, queue: str, body: bytes) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(_persistent(body), routing_key=queue)


async def _get_one(url: str, queue: str) -> bytes:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        async with q.iterator() as messages:
            async for message in messages:
                await message.ack()
                return message.body
    raise AssertionError("queue iterator ended")


async def test_a_rabbit_node_serves_quorum_queues_and_survives_an_app_restart(
    rabbit_node: RabbitNode,
) -> None:
    assert rabbit_node.name != "rabbit@localhost"
    assert ":5672/" not in rabbit_node.url
    queue = f"q-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(rabbit_node.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(_persistent(b"before"), routing_key=queue)
    wait_until(lambda: rabbit_node.queues()[queue]["messages"] == 1, what="the message counted")

    rabbit_node.stop_app()
    rabbit_node.start_app()

    assert await asyncio.wait_for(_get_one(rabbit_node.url, queue), 30) == b"before"
    await _publish_one(rabbit_node.url, queue, b"after")
    wait_until(lambda: rabbit_node.queues()[queue]["messages_ready"] == 1, what="one ready")

    rabbit_node.stop()
    assert not pids_mentioning(str(rabbit_node.base))
    assert not rabbit_node.base.exists()
    rabbit_node.stop()  # again, as teardown will: nothing left to do, nothing raised


async def test_a_rabbit_node_takes_connection_and_memory_faults(rabbit_node: RabbitNode) -> None:
    victim = await aio_pika.connect(rabbit_node.url)
    closed = asyncio.Event()
    victim.close_callbacks.add(lambda *_: closed.set())
    rabbit_node.close_all_connections()
    await asyncio.wait_for(closed.wait(), 20)
    await victim.close()

    rabbit_node.set_memory_watermark(0.000001)
    connection = await aio_pika.connect(rabbit_node.url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        publish = asyncio.create_task(
            channel.default_exchange.publish(_persistent(b"x"), routing_key=queue.name)
        )

        async def broker_blocks_it() -> bool:
            result = rabbit_node.ctl("list_connections", "-q", "--formatter", "json", "state")
            states = {row["state"] for row in json.loads(result.stdout or "[]")}
            return bool(states & {"blocked", "blocking"}) and not publish.done()

        await eventually(broker_blocks_it, what="the broker to block the publisher")
        rabbit_node.reset_memory_watermark()
        await asyncio.wait_for(publish, 30)
        wait_until(lambda: rabbit_node.queues()[queue.name]["messages"] == 1, what="it arrived")
    finally:
        await connection.close()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
@pytest.mark.cluster
async def test_a_rabbit_cluster_replicates_fails_over_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    cluster = RabbitCluster(tmp_path)
    try:
        cluster.start()
        names = sorted(node.name for node in cluster.nodes)
        assert len(set(cluster.urls)) == 3
        assert not any(":5672/" in url for url in cluster.urls)
        assert "rabbit@localhost" not in names
        assert sorted(cluster.registered_in_epmd()) == [name.split("@")[0] for name in names]

        queue = f"q-{uuid.uuid4().hex[:8]}"
        connection = await aio_pika.connect(cluster.urls[0])
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
            await channel.default_exchange.publish(_persistent(b"kept"), routing_key=queue)
        replicas = cluster.quorum_queue(queue)
        assert sorted(replicas["members"]) == sorted(replicas["online"]) == names

        leader = cluster.leader(queue)
        cluster.kill(leader)
        assert not leader.pids()
        survivor = next(node for node in cluster.nodes if node is not leader)
        new_leader = wait_until(
            lambda: cluster.quorum_queue(queue, via=survivor)["leader"] not in ("", leader.name),
            what="a new leader",
        )
        assert new_leader
        assert await asyncio.wait_for(_get_one(survivor.url, queue), 30) == b"kept"

        cluster.restart(leader)
        assert cluster.clustered()
        await _publish_one(leader.url, queue, b"after")
        assert await asyncio.wait_for(_get_one(survivor.url, queue), 30) == b"after"

        cluster.pause(survivor)
        assert {_state(pid) for pid in survivor.pids()} == {"T"}
        cluster.resume(survivor)
        assert "T" not in {_state(pid) for pid in survivor.pids()}
    finally:
        cluster.stop()
    assert not any(pids_mentioning(str(node.base)) for node in cluster.nodes)
    assert not any(node.base.exists() for node in cluster.nodes)
    assert wait_until(lambda: not cluster.registered_in_epmd(), what="epmd to forget") is True
    cluster.stop()  # again, as teardown will


async def _select_one(url: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())
    finally:
        await engine.dispose()


async def test_a_postgres_node_stops_starts_and_recovers_from_a_kill(
    postgres_node: PostgresNode, tmp_path: Path
) -> None:
    assert ":5432/" not in postgres_node.url
    url = await postgres_node.create_database("orders")
    assert url.endswith("/orders")
    assert await _select_one(url) == 1

    postgres_node.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"), timeout=5)
    postgres_node.start()
    assert await _select_one(url) == 1

    postgres_node.kill()
    assert postgres_node.postmaster_pid() is None
    postgres_node.start()
    assert await _select_one(url) == 1

    postgres_node.destroy()
    assert not postgres_node.base.exists()
    assert not pids_mentioning(str(postgres_node.data))
    postgres_node.destroy()  # again, as teardown will
