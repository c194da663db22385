"""The consumer's sender check with the real broker and the users ``eventctl broker provision``
makes: every delivery's ``user_id`` (which the broker checks against the publishing user) is
matched against the catalog's producers of its type.

The users are provisioned once for the module into a fresh vhost (names without a prefix, the
user prefix ``<vhost>.``); every test purges the queues it uses first.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import pytest
from aiormq.exceptions import AMQPError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from libs.contracts.tests.samples import sample
from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.envelope import CloudEvent
from tributary.contracts.events import CommentMentionedV1, Payload, UserCreatedV2
from tributary.eventctl import dlq
from tributary.eventctl.access import demo_password
from tributary.eventctl.cli import main_async
from tributary.eventctl.entries import Selector
from tributary.eventctl.replay import _app_id, replay_headers
from tributary.messaging import context
from tributary.messaging import headers as h
from tributary.messaging.bus import Bus
from tributary.messaging.db import InboxRow, create_engine, create_runtime_tables
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import OutcomeRecorder, started_bus
from tributary.messaging.topology import Names
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

NAMES = Names("")


def _ctl(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
async def vhost(rabbitmq: Found) -> AsyncIterator[str]:
    """A fresh vhost with every catalog user (prefix ``<vhost>.``); removed afterwards."""
    assert rabbitmq.controllable, "these tests provision the local broker with rabbitmqctl"
    name = f"t-sender-{uuid.uuid4().hex[:10]}"
    try:
        args = ["broker", "provision", "--url", rabbitmq.url, "--vhost", name]
        code = await main_async([*args, "--prefix", f"{name}.", "--name-prefix", ""])
        assert code == 0
        yield name
    finally:
        await asyncio.to_thread(_remove, name)


def _remove(vhost: str) -> None:
    """Delete the vhost and its users (one call for all users: each call starts a VM)."""
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, check=False)
    users = json.loads(_ctl("list_users", "--formatter", "json", "-q"))
    ours = [str(u["user"]) for u in users if str(u["user"]).startswith(f"{vhost}.")]
    if ours:
        names = ", ".join(f'<<"{user}">>' for user in ours)
        _ctl(
            "eval", f'[rabbit_auth_backend_internal:delete_user(U, <<"test">>) || U <- [{names}]].'
        )


@pytest.fixture(scope="module")
def url_of(rabbitmq: Found, vhost: str) -> Callable[[str], str]:
    def url(role: str) -> str:
        user = f"{vhost}.{role}"
        broker = urlsplit(rabbitmq.url)
        host = f"{broker.hostname}:{broker.port or 5672}"
        return f"amqp://{quote(user, safe='')}:{demo_password(user)}@{host}/{quote(vhost, safe='')}"

    return url


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'inbox.db'}")
    await create_runtime_tables(engine)
    yield engine
    await engine.dispose()


class Handled:
    """A handler that records what it saw (the side effect); fails the first ``fail`` calls."""

    def __init__(self, fail: int = 0) -> None:
        self.seen: list[tuple[str, bool]] = []
        self._fail = fail

    async def __call__(self, event: CloudEvent[Any], uow: UnitOfWork) -> None:
        if self._fail > 0:
            self._fail -= 1
            raise RuntimeError("fails once")
        self.seen.append((event.id, context.current().is_replay))

    @property
    def ids(self) -> list[str]:
        return [event_id for event_id, _ in self.seen]


Started = tuple[Bus, OutcomeRecorder]


@pytest.fixture
def run_service(
    vhost: str, url_of: Callable[[str], str], engine: AsyncEngine
) -> Callable[[str, Mapping[type[Payload], Handled]], Any]:
    """Start ``service`` as its own broker user with the sender check on (queues purged)."""

    @asynccontextmanager
    async def run(
        service: str, handlers: Mapping[type[Payload], Handled]
    ) -> AsyncIterator[Started]:
        settings = MessagingSettings(
            rabbitmq_url=url_of(service),
            name_prefix="",
            broker_user_prefix=f"{vhost}.",
            verify_sender=True,
            retry_tiers=(0.2,),
            inprocess_retries=1,
            inprocess_backoff_seconds=0.01,
            shutdown_grace_seconds=2.0,
        )
        bus = Bus(service, engine, handlers=dict(handlers), settings=settings)
        await _purge(url_of("eventctl"), [f"{service}.events", f"{service}.dlq"])
        async with started_bus(bus, owns_topology=False) as outcomes:
            yield bus, outcomes

    return run


async def _purge(url: str, queues: list[str]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for name in queues:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except Exception:  # not declared yet (the first test)
                channel = await connection.channel()
                continue
            await queue.purge()
    finally:
        await connection.close()


def _event(routing_key: str, *, idempotencykey: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "type": f"{NAMESPACE}.{routing_key}",
        "source": "/services/test",
        "time": "2026-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": uuid.uuid4().hex,
        "data": sample(routing_key),
    }
    if idempotencykey is not None:
        event["idempotencykey"] = idempotencykey
    return event


async def _send(
    url: str,
    event: Mapping[str, Any],
    *,
    queue: str | None = None,
    exchange: str = "",
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish confirmed as the URL's user: to ``queue`` by name on the default exchange (what
    every service may do), or on ``exchange`` with the event's routing key."""
    routing_key = str(event["type"]).removeprefix(f"{NAMESPACE}.")
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = (
            channel.default_exchange
            if queue is not None
            else await channel.get_exchange(exchange, ensure=False)
        )
        await target.publish(
            aio_pika.Message(
                json.dumps(event).encode(),
                message_id=str(event["id"]),
                content_type="application/cloudevents+json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers or {},
                user_id=_user(url),
            ),
            queue if queue is not None else routing_key,
            mandatory=True,
        )
    finally:
        await connection.close()


def _user(url: str) -> str:
    return unquote(urlsplit(url).username or "")


async def _dead_letters(url: str, queue: str, expect: int) -> list[aio_pika.IncomingMessage]:
    """Take ``expect`` messages from ``queue`` (acked) or fail after 10 s."""
    connection = await aio_pika.connect(url)
    got: list[aio_pika.IncomingMessage] = []
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)

        async def arrived() -> bool:
            message = await declared.get(fail=False, no_ack=True)
            if message is not None:
                got.append(message)  # type: ignore[arg-type]
            return len(got) >= expect

        await eventually(arrived, timeout=10, what=f"{expect} message(s) in {queue}")
    finally:
        await connection.close()
    return got


async def test_publishing_sets_user_id_to_the_connections_user(
    url_of: Callable[[str], str], run_service: Any
) -> None:
    """The runtime's own publishes (the relay, retry and DLQ copies) carry the user id: the
    broker would refuse one that is not the connection's, so they would fail otherwise."""
    handled = Handled()
    async with run_service("onboarding", {UserCreatedV2: handled}) as (bus, outcomes):
        assert bus.publisher is not None
        assert bus.publisher.user == _user(url_of("onboarding"))
        # a user id other than the connection's is refused by the broker itself
        with pytest.raises(AMQPError):
            await _forged_user_id(url_of("identity"), _event("user.created.v2"))
        real = _event("user.created.v2")
        await _send(url_of("identity"), real, exchange=NAMES.exchange)
        await outcomes.wait_until_handled(real["id"])
        assert handled.ids == [real["id"]]


async def _forged_user_id(url: str, event: Mapping[str, Any]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(NAMES.exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(json.dumps(event).encode(), user_id="someone-else"),
            "user.created.v2",
        )
        await asyncio.wait_for(channel.close(), 5)
    finally:
        await connection.close()


async def test_a_rogue_sender_is_dead_lettered_and_the_real_event_processed(
    vhost: str, url_of: Callable[[str], str], run_service: Any, engine: AsyncEngine
) -> None:
    handled = Handled()
    async with run_service("onboarding", {UserCreatedV2: handled}) as (_bus, outcomes):
        # audit may write on the default exchange (its retries): straight into onboarding's
        # queue, a user.created it does not own, taking identity's idempotency key first
        stolen = _event("user.created.v2", idempotencykey="user.created:usr_stolen")
        await _send(url_of("audit"), stolen, queue="onboarding.events")
        await outcomes.wait_until_handled(stolen["id"], "dead_lettered")
        # the real one, from identity, with the same key: processed
        real = _event("user.created.v2", idempotencykey="user.created:usr_stolen")
        await _send(url_of("identity"), real, exchange=NAMES.exchange)
        await outcomes.wait_until_handled(real["id"])
        assert handled.ids == [real["id"]]
        assert outcomes.of(stolen["id"])[0].reason == "unauthorized_producer"

    letters = await _dead_letters(url_of("eventctl"), "onboarding.dlq", 1)
    (letter,) = [m for m in letters if m.message_id == stolen["id"]]
    assert letter.headers[h.REASON] == "unauthorized_producer"
    assert h.text(letter.headers[h.PRODUCER]) == "audit"
    assert letter.user_id == f"{vhost}.onboarding"
    async with engine.connect() as conn:
        keys = (await conn.execute(select(col(InboxRow.key)))).scalars().all()
    assert keys == ["identity|user.created:usr_stolen"]


async def test_a_message_without_user_id_is_unauthorized(
    url_of: Callable[[str], str], run_service: Any
) -> None:
    handled = Handled()
    async with run_service("onboarding", {UserCreatedV2: handled}) as (_bus, outcomes):
        event = _event("user.created.v2")
        await _send_without_user_id(url_of("audit"), event, "onboarding.events")
        (record,) = await outcomes.wait_until_handled(event["id"], "dead_lettered")
        assert record.reason == "unauthorized_producer"
        assert handled.seen == []


async def _send_without_user_id(url: str, event: Mapping[str, Any], queue: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(event).encode(), message_id=str(event["id"])), queue
        )
    finally:
        await connection.close()


async def test_the_replay_marker_counts_only_from_the_operator(
    vhost: str, url_of: Callable[[str], str], run_service: Any
) -> None:
    handled = Handled()
    async with run_service("onboarding", {UserCreatedV2: handled}) as (_bus, outcomes):
        marked = {h.REPLAY: "1", h.REPLAY_FORCED: "1", h.PRODUCER: "identity"}
        # identity itself marks it: a normal event (side effects not suppressed)
        from_identity = _event("user.created.v2")
        await _send(url_of("identity"), from_identity, exchange=NAMES.exchange, headers=marked)
        (record,) = await outcomes.wait_until_handled(from_identity["id"])
        assert record.replay is False
        # the operator's replay copy names its producer: a replay
        replayed = _event("user.created.v2")
        await _send(url_of("eventctl"), replayed, queue="onboarding.events", headers=marked)
        (record,) = await outcomes.wait_until_handled(replayed["id"])
        assert record.replay is True
        # the operator's copy without a producer: nobody can be named
        unnamed = _event("user.created.v2")
        await _send(url_of("eventctl"), unnamed, queue="onboarding.events", headers={h.REPLAY: "1"})
        (record,) = await outcomes.wait_until_handled(unnamed["id"], "dead_lettered")
        assert record.reason == "unauthorized_producer"
        assert handled.seen == [(from_identity["id"], False), (replayed["id"], True)]


async def test_a_retried_event_keeps_its_producer(
    vhost: str, url_of: Callable[[str], str], run_service: Any
) -> None:
    handled = Handled(fail=1)
    async with run_service("onboarding", {UserCreatedV2: handled}) as (_bus, outcomes):
        event = _event("user.created.v2")
        await _send(url_of("identity"), event, exchange=NAMES.exchange)
        await outcomes.wait_until_handled(event["id"], "retried")
        await outcomes.wait_until_handled(event["id"])
        assert handled.ids == [event["id"]]


async def test_an_idempotency_key_is_the_producers_own(
    url_of: Callable[[str], str], run_service: Any, engine: AsyncEngine
) -> None:
    """comments-app may publish comment.mentioned, and chooses its key: it cannot take the key
    of identity's user.created away from audit, which consumes both."""
    mentions, users = Handled(), Handled()
    handlers: dict[type[Payload], Handled] = {CommentMentionedV1: mentions, UserCreatedV2: users}
    async with run_service("audit", handlers) as (_bus, outcomes):
        squatter = _event("comment.mentioned.v1", idempotencykey="k-1")
        await _send(url_of("comments-app"), squatter, exchange=NAMES.exchange)
        await outcomes.wait_until_handled(squatter["id"])
        real = _event("user.created.v2", idempotencykey="k-1")
        await _send(url_of("identity"), real, exchange=NAMES.exchange)
        await outcomes.wait_until_handled(real["id"])
        assert users.ids == [real["id"]]
    async with engine.connect() as conn:
        keys = sorted((await conn.execute(select(col(InboxRow.key)))).scalars().all())
    assert keys == ["comments-app|k-1", "identity|k-1"]


async def test_dlq_replay_names_the_sender_not_a_forged_producer_header(
    vhost: str, url_of: Callable[[str], str], run_service: Any
) -> None:
    """A service may write into another's DLQ (the dead-letter exchange): a producer header it
    forges there is replaced by the sender when the operator replays the DLQ."""
    handled = Handled()
    forged = _event("user.created.v2")
    await _purge(url_of("eventctl"), ["onboarding.dlq"])
    async with run_service("onboarding", {UserCreatedV2: handled}) as (_bus, outcomes):
        await _to_dlq(url_of("audit"), forged)
        connection = await aio_pika.connect(url_of("eventctl"))
        try:
            counts = await dlq.replay(
                connection,
                NAMES.service_queues("onboarding", 0),
                dlq.Scope(Selector.of(ids=[forged["id"]])),
                batch=10,
                dry_run=False,
                user_prefix=f"{vhost}.",
            )
        finally:
            await connection.close()
        assert counts.republished == 1
        (record,) = await outcomes.wait_until_handled(forged["id"], "dead_lettered")
        assert record.reason == "unauthorized_producer"
        assert handled.seen == []


async def _to_dlq(url: str, event: Mapping[str, Any]) -> None:
    """Put ``event`` into onboarding's DLQ through the dead-letter exchange, as its sender."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(NAMES.dlx, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                json.dumps(event).encode(),
                message_id=str(event["id"]),
                headers={h.PRODUCER: "identity", h.REASON: "handler_error"},
                user_id=_user(url),
            ),
            "onboarding.dlq",
            mandatory=True,
        )
    finally:
        await connection.close()


def test_an_outbox_replay_names_the_producing_service() -> None:
    """The operator's copy names the service whose outbox it read (the event's source)."""
    body = json.dumps(_event("user.created.v2") | {"source": "/services/identity"}).encode()
    marks = replay_headers("user.created.v2", force=False, producer=_app_id(body))
    assert marks[h.PRODUCER] == "identity"
    assert marks[h.REPLAY] == "1"
