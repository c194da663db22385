"""Connections over several broker nodes: the first that answers, the next when it is lost.

A "node" that dies is a TCP proxy in front of the real local broker: closing it refuses new
connections and drops the open ones, as a killed node does.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine
from yarl import URL

from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.connection import FailoverConnection, connect_failover
from tributary.messaging.settings import MessagingSettings, split_urls
from tributary.messaging.testing import isolated_settings, started_bus
from tributary.testkit.processes import free_port

from .conftest import on_user_created, user_created_round_trip

pytestmark = pytest.mark.broker


class NodeProxy:
    """Forwards TCP connections to the broker until :meth:`kill`."""

    def __init__(self, broker_url: str) -> None:
        self.upstream = URL(broker_url)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def url(self, broker_url: str) -> str:
        return str(URL(broker_url).with_port(self.port))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.upstream.host, self.upstream.port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def kill(self) -> None:
        """Refuse new connections and cut the open ones (no AMQP close: a crash)."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


@pytest.fixture
async def proxy(broker_url: str) -> AsyncIterator[NodeProxy]:
    node = NodeProxy(broker_url)
    await node.start()
    yield node
    await node.kill()


def dead_url(broker_url: str) -> str:
    """A node nobody listens on."""
    return str(URL(broker_url).with_port(free_port()))


async def test_a_dead_node_first_in_the_list_is_skipped(broker_url: str) -> None:
    connection = await connect_failover([dead_url(broker_url), broker_url], timeout=5)
    try:
        assert connection.node_url == URL(broker_url)
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue.name)
        message = await queue.get(timeout=5)
        assert message.body == b"x"
    finally:
        await connection.close()


async def test_no_node_answering_fails_at_once(broker_url: str) -> None:
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(
            connect_failover([dead_url(broker_url), dead_url(broker_url)], timeout=5), 20
        )


async def test_a_lost_node_is_replaced_by_the_next_with_its_consumer(
    broker_url: str, proxy: NodeProxy
) -> None:
    connection = await connect_failover(
        [proxy.url(broker_url), broker_url], timeout=5, reconnect_interval=0.5
    )
    assert isinstance(connection, FailoverConnection)
    queue_name = f"t{uuid.uuid4().hex[:10]}.failover"
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await message.ack()
        await received.put(message.body)

    try:
        assert connection.node_url.port == proxy.port
        channel = await connection.channel()  # held: a robust connection keeps channels weakly
        queue = await channel.declare_queue(queue_name, exclusive=True)
        await queue.consume(on_message)
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())

        await proxy.kill()
        await asyncio.wait_for(reconnected.wait(), 20)

        assert connection.node_url == URL(broker_url)
        producer = await aio_pika.connect(broker_url)
        async with producer:
            publishing = await producer.channel()
            await publishing.default_exchange.publish(
                aio_pika.Message(b"after"), routing_key=queue_name
            )
        assert await asyncio.wait_for(received.get(), 20) == b"after"
    finally:
        await connection.close()


async def test_a_bus_given_node_urls_runs_on_the_first_live_one(
    engine: AsyncEngine, broker_url: str
) -> None:
    settings = isolated_settings(broker_url, rabbitmq_urls=(dead_url(broker_url), broker_url))
    assert settings.broker_urls[1] == broker_url
    bus = Bus("probe", engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    async with started_bus(bus) as outcomes:
        await user_created_round_trip(bus, outcomes)
        assert bus.connected


def test_rabbitmq_urls_are_read_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URLS", " amqp://u:p@a:5681/ ,amqp://u:p@b:5682/,, ")
    monkeypatch.delenv("RABBITMQ_URL", raising=False)
    settings = MessagingSettings()
    assert settings.broker_urls == ("amqp://u:p@a:5681/", "amqp://u:p@b:5682/")
    assert settings.rabbitmq_url == "amqp://u:p@a:5681/"  # one-node tools use the first


def test_rabbitmq_url_alone_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RABBITMQ_URLS", raising=False)
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@solo:5672/")
    assert MessagingSettings().broker_urls == ("amqp://u:p@solo:5672/",)


def test_a_list_wins_over_the_single_url_for_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@solo:5672/")
    monkeypatch.setenv("RABBITMQ_URLS", "amqp://u:p@a:5681/,amqp://u:p@b:5682/")
    settings = MessagingSettings()
    assert settings.broker_urls == ("amqp://u:p@a:5681/", "amqp://u:p@b:5682/")
    assert settings.rabbitmq_url == "amqp://u:p@solo:5672/"


@pytest.mark.parametrize("bad", ["http://a:5672/", "a:5672", "amqp://a/,tcp://b/"])
def test_a_node_that_is_not_an_amqp_url_is_refused(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("RABBITMQ_URLS", bad)
    with pytest.raises(ValidationError, match="not an AMQP URL"):
        MessagingSettings()


_part = st.text(
    alphabet=st.characters(exclude_characters=",", exclude_categories=["Cs"]), max_size=30
)


@given(st.lists(_part, max_size=6), st.lists(st.sampled_from([" ", "\t", ""]), max_size=3))
def test_split_urls_keeps_every_non_blank_part_in_order(parts: list[str], pad: list[str]) -> None:
    glue = "".join(pad)
    split = split_urls(f",{glue}".join(parts))
    assert split == tuple(p.strip() for p in parts if p.strip())
    assert all(part and "," not in part and part == part.strip() for part in split)


@given(st.text(max_size=200))
def test_any_rabbitmq_urls_value_is_read_or_refused_cleanly(value: str) -> None:
    try:
        settings = MessagingSettings.model_validate({"rabbitmq_urls": value})
    except ValidationError:
        return
    assert all(url.startswith(("amqp://", "amqps://")) for url in settings.broker_urls)
