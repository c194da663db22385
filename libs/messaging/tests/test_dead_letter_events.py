"""Dead letters announced: every way the runtime dead-letters writes one ``message.dead_lettered``
event into the service's outbox, before the delivery is acked, with no payload and no PII.

The property test drives the real consumer code with deliveries built in memory (any body,
any headers, secrets planted in every part of the message that is its own text) and checks
the announcement; the others run a real bus on the real broker and both databases.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.contracts.tests.samples import sample
from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.envelope import CONTENT_TYPE, CloudEvent, new_event
from tributary.contracts.events import MessageDeadLetteredV1, UserCreatedV2
from tributary.contracts.validation import validate
from tributary.messaging import PermanentError, headers
from tributary.messaging.bus import Bus
from tributary.messaging.consumer import QueueConsumer, Subscription
from tributary.messaging.db import OutboxRow, create_engine, create_runtime_tables
from tributary.messaging.deadletters import (
    body_words,
    event_id,
    idempotency_key,
    masked_error,
)
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import (
    announced_dead_letters,
    isolated_settings,
    publish_raw,
    queue_depth,
    read_queue,
    started_bus,
)
from tributary.messaging.topology import Names
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.waiting import eventually

from .helpers import body_of, queues_of, routing_key_of, user_created
from .relay_support import Capture

SERVICE = "probe"
DEAD = "message.dead_lettered.v1"
UserCreated = CloudEvent[UserCreatedV2]


# -- the masking, by example -------------------------------------------------------------------


def test_the_error_keeps_its_first_line_without_sql_parameters_addresses_or_quoted_values() -> None:
    detail = (
        "IntegrityError: (sqlite3.IntegrityError) UNIQUE constraint failed: users.email\n"
        "[SQL: INSERT INTO users (email, name) VALUES (?, ?)]\n"
        "[parameters: ('ada@example.com', 'Ada Lovelace')]"
    )
    assert masked_error(detail, b"") == (
        "IntegrityError: (sqlite3.IntegrityError) UNIQUE constraint failed: users.email"
    )
    assert masked_error("KeyError: 'Lovelace' for ada@example.com", b"") == (
        "KeyError: '***' for a***@example.com"
    )
    assert masked_error('duplicate key "Ada"\nDETAIL: Key (name)=(Ada)', b"") == (
        'duplicate key "***"'
    )
    assert len(masked_error("x" * 5000, b"")) == 500


def test_every_word_of_the_messages_own_text_is_masked_but_not_its_field_names() -> None:
    body = json.dumps(
        {
            "id": "evt-1",
            "type": "com.tributary.user.created.v2",
            "subject": "Babbage",
            "data": {"given_name": "Augusta", "variables": {"Byron": "x"}},
            "mood": "cheerful",
        }
    ).encode()
    assert body_words(body) >= {"augusta", "byron", "babbage", "mood", "cheerful"}
    assert not body_words(body) & {"given_name", "variables", "evt", "tributary", "user"}
    detail = "data.given_name: Augusta Byron Babbage is cheerful (mood) for user.created.v2"
    assert masked_error(detail, body) == (
        "data.given_name: *** *** *** is *** (***) for user.created.v2"
    )
    # not JSON: every word of the body is the message's own
    assert masked_error("body is not JSON: Expecting value", b"Ada is not JSON") == (
        "body *** *** ***: Expecting value"
    )


# -- the property: any poison message, in memory ---------------------------------------------

SECRET = st.from_regex(r"Zq[a-z]{6,10}", fullmatch=True)
"""Text that stands for personal data: it must never reach an announcement."""
SAFE_ID = st.uuids().map(str)
FILLER = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
ATTRIBUTE_FILLER = st.text(st.characters(exclude_categories=["Cs", "Cc", "Cn"]), max_size=12)


@dataclass
class Delivery:
    """An incoming message built in memory: what the consumer reads of one, and its settling."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    routing_key: str = "user.created.v2"
    user_id: str | None = "p.identity"
    type: str | None = None
    redelivered: bool = False
    delivery_tag: int = 1
    content_type: str | None = CONTENT_TYPE
    content_encoding: str | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    timestamp: Any = None
    app_id: str | None = None
    channel: Any = field(default_factory=lambda: SimpleNamespace(is_closed=False))
    settled: list[str] = field(default_factory=list)

    async def ack(self, multiple: bool = False) -> None:
        self.settled.append("ack")

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.settled.append("nack")


@dataclass
class Copies:
    """A publisher that keeps what the consumer publishes (its DLQ and retry copies)."""

    user: str = "p.probe"
    published: list[tuple[str, str, aio_pika.Message]] = field(default_factory=list)

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        self.published.append((exchange, routing_key, message))


@dataclass(frozen=True)
class Poison:
    kind: str
    delivery: Delivery
    secrets: tuple[str, ...]
    reason: str


def _envelope(data: dict[str, Any], **attributes: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "type": f"{NAMESPACE}.user.created.v2",
        "source": "/external/property",
        "time": "2026-01-01T00:00:00Z",
        "correlationid": uuid.uuid4().hex,
        "data": data,
        **attributes,
    }


@st.composite
def poison_messages(draw: st.DrawFn) -> Poison:
    secrets = tuple(draw(st.lists(SECRET, min_size=1, max_size=4, unique=True)))

    def text(attribute: bool = False) -> str:
        """Secrets among filler (spaces, punctuation, anything; ``attribute``: text a
        CloudEvent attribute may hold, no control characters)."""
        filler = ATTRIBUTE_FILLER if attribute else FILLER
        separators = [" ", ".", "@", "'", '"', "-"] + ([] if attribute else ["\n"])
        parts = [draw(filler)]
        for secret in secrets:
            parts += [secret, draw(st.sampled_from(separators)), draw(filler)]
        return "".join(parts)

    kind = draw(
        st.sampled_from(
            ["bytes", "json", "schema", "unknown", "extensions", "handler", "retries", "sender"]
        )
    )
    routing_key, user, reason = "user.created.v2", "p.identity", "handler_error"
    extra_headers: dict[str, Any] = {}
    if kind == "bytes":
        body, reason = text().encode("utf-8", "replace"), "malformed"
    elif kind == "json":
        body = json.dumps({text(): text(), "data": [text()]}).encode()
        reason = "malformed"
    elif kind == "schema":
        data = sample("user.created.v2", given_name=None, family_name=text(), email=text())
        envelope = _envelope(data, subject=text(attribute=True))
        body, reason = json.dumps(envelope).encode(), "schema_invalid"
    elif kind == "unknown":
        routing_key, reason = "user.created.v9", "unknown_type"
        envelope = _envelope(sample("user.created.v2", given_name=text()))
        envelope["type"] = f"{NAMESPACE}.user.created.v9"
        body = json.dumps(envelope).encode()
    else:
        names = {"given_name": text() or "x", "family_name": text()}
        plan = "starter" if kind == "retries" else "pro"
        envelope = _envelope(sample("user.created.v2", plan=plan, **names))
        if kind == "extensions":
            envelope[secrets[0].lower()] = text(attribute=True)
            envelope["subject"] = text(attribute=True)
        if kind == "retries":  # the last tier already used: this failure is the last
            extra_headers = {headers.RETRIES: 1, headers.ATTEMPTS: 41}
            reason = "retries_exhausted"
        if kind == "sender":
            user, reason = "p.mallory", "unauthorized_producer"
        body = json.dumps(envelope, ensure_ascii=draw(st.booleans())).encode()
    planted = {
        name: draw(st.sampled_from([text(), text().encode("utf-8", "replace"), 7]))
        for name in draw(
            st.lists(
                st.sampled_from(
                    [
                        headers.ERROR,
                        headers.REASON,
                        headers.EXCEPTION,
                        headers.PRODUCER,
                        headers.FIRST_FAILURE,
                        headers.CONSUMER,
                        "x-custom",
                        "traceparent",
                    ]
                ),
                max_size=4,
                unique=True,
            )
        )
    }
    delivery = Delivery(
        body=body,
        headers={**planted, **extra_headers},
        message_id=draw(st.one_of(st.none(), SAFE_ID)),
        routing_key=routing_key,
        user_id=user,
        type=draw(st.one_of(st.none(), st.just(f"{NAMESPACE}.{routing_key}"))),
    )
    return Poison(kind, delivery, secrets, reason)


async def refuse_everyone(event: UserCreated, uow: UnitOfWork) -> None:
    """Fails with the personal data of the event in its message (as real bugs do)."""
    data = event.data
    if data.plan == "starter":  # a failure worth retrying
        raise RuntimeError(f"mailbox of {data.given_name} is full")
    raise PermanentError(f"{data.given_name} {data.family_name} <{data.email}> refused")


class InMemory:
    """The consumer of one queue set with a real SQLite outbox and no broker."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.copies = Copies()
        names = Names("")
        self.consumer = QueueConsumer(
            service=SERVICE,
            queues=names.service_queues(SERVICE, 1),
            subscriptions={
                "user.created": Subscription(UserCreatedV2, refuse_everyone, irreversible=False),
            },
            engine=engine,
            publisher=cast(Any, self.copies),
            names=names,
            settings=MessagingSettings(
                verify_sender=True,
                broker_user_prefix="p.",
                inprocess_retries=1,
                inprocess_backoff_seconds=0,
            ),
            on_commit=lambda: None,
            listeners=[],
        )

    async def deliver(self, delivery: Delivery) -> None:
        message = cast(AbstractIncomingMessage, delivery)
        await self.consumer._on_message(message)
        await self.consumer.handle([message])

    async def forget(self) -> None:
        self.copies.published.clear()
        async with self.engine.begin() as conn:
            await conn.execute(delete(OutboxRow))


@pytest.fixture(scope="module")
def in_memory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[asyncio.Runner, InMemory]]:
    path = tmp_path_factory.mktemp("dead-letters") / "outbox.db"
    with asyncio.Runner() as runner:
        engine = create_engine(f"sqlite+aiosqlite:///{path}")
        runner.run(create_runtime_tables(engine))
        yield runner, InMemory(engine)
        runner.run(engine.dispose())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(poison=poison_messages())
def test_any_poison_message_is_announced_once_valid_and_without_its_text(
    in_memory: tuple[asyncio.Runner, InMemory], poison: Poison
) -> None:
    runner, run = in_memory
    runner.run(run.forget())
    runner.run(run.deliver(poison.delivery))

    [(exchange, dlq, copy)] = run.copies.published
    assert (exchange, dlq) == ("tributary.dlx", "probe.dlq")
    assert copy.headers is not None
    assert copy.headers[headers.REASON] == poison.reason
    assert poison.delivery.settled == ["ack"]  # after the DLQ copy and the announcement
    [event] = runner.run(announced_dead_letters(run.engine))
    assert copy.headers[headers.ANNOUNCEMENT] == event.id
    validate(DEAD, event.data, "strict")
    assert event.data["reason"] == poison.reason
    assert event.data["service"] == event.data["consumer"] == SERVICE
    assert (event.data["queue"], event.data["dlq"]) == ("probe.events", "probe.dlq")
    assert event.idempotencykey is not None
    assert event.id == event_id(event.idempotencykey)
    wire = event.to_bytes().decode().casefold()
    leaked = [s for s in poison.secrets if s.casefold() in wire]
    assert not leaked, (poison.kind, event.data["error"])
    if poison.kind in ("schema", "unknown", "extensions", "handler", "retries", "sender"):
        sent = json.loads(poison.delivery.body)
        assert event.data["message_id"] == event.causationid == sent["id"]
        assert event.correlationid == event.data["correlation_id"] == sent["correlationid"]
    if poison.kind == "retries":
        assert event.data["attempts"] == 42
    # the same delivery dead-lettered again (a redelivery): the same announcement, one row
    again = Delivery(**{**vars(poison.delivery), "settled": [], "redelivered": True})
    runner.run(run.deliver(again))
    assert again.settled == ["ack"]
    assert [e.id for e in runner.run(announced_dead_letters(run.engine))] == [event.id]


def test_a_copy_replayed_from_the_dlq_that_fails_again_is_announced_again(
    in_memory: tuple[asyncio.Runner, InMemory],
) -> None:
    runner, run = in_memory
    runner.run(run.forget())
    body = b"{still broken"
    runner.run(run.deliver(Delivery(body=body, headers={}, message_id="m-replayed")))
    [first] = runner.run(announced_dead_letters(run.engine))
    replayed = {headers.ANNOUNCED_BEFORE: first.id}  # what eventctl dlq replay sets
    for _ in range(2):  # dead-lettered again after the replay; then that copy redelivered
        runner.run(run.deliver(Delivery(body=body, headers=replayed, message_id="m-replayed")))
    told = runner.run(announced_dead_letters(run.engine))
    assert [e.data["reason"] for e in told] == ["malformed", "malformed"]
    assert told[0].id == first.id != told[1].id
    assert [c.headers[headers.ANNOUNCEMENT] for _e, _k, c in run.copies.published if c.headers] == [
        first.id,
        told[1].id,
        told[1].id,
    ]


def test_a_dead_lettered_announcement_announces_nothing(
    in_memory: tuple[asyncio.Runner, InMemory],
) -> None:
    runner, run = in_memory
    runner.run(run.forget())
    for body, routing_key in [
        (b"not json", DEAD),  # malformed, on the announcements' routing key
        (body_of(user_created() | {"type": f"{NAMESPACE}.{DEAD}"}), "user.created.v2"),
    ]:
        delivery = Delivery(body=body, headers={}, message_id=None, routing_key=routing_key)
        runner.run(run.deliver(delivery))
        assert delivery.settled == ["ack"]
    assert len(run.copies.published) == 2
    assert all(headers.ANNOUNCEMENT not in (c.headers or {}) for _e, _k, c in run.copies.published)
    assert runner.run(announced_dead_letters(run.engine)) == []


def test_an_outbox_that_fails_the_announcement_keeps_the_delivery_unacked(
    in_memory: tuple[asyncio.Runner, InMemory], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, run = in_memory
    runner.run(run.forget())
    delivery = Delivery(body=b"{broken", headers={}, message_id="msg-outage-1")
    real = run.consumer._write_announcement

    async def disk_failure(*_args: Any) -> bool:
        raise sa_exc.OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(run.consumer, "_write_announcement", disk_failure)
    with pytest.raises(InfrastructureError):
        runner.run(run.deliver(delivery))
    assert delivery.settled == []  # not acked: the consumer pauses and handles it again
    assert len(run.copies.published) == 1  # the DLQ copy was confirmed first
    assert runner.run(announced_dead_letters(run.engine)) == []

    monkeypatch.setattr(run.consumer, "_write_announcement", real)
    runner.run(run.consumer.handle([cast(AbstractIncomingMessage, delivery)]))
    assert delivery.settled == ["ack"]
    assert len(run.copies.published) == 2  # a duplicate in the DLQ, never a loss
    [event] = runner.run(announced_dead_letters(run.engine))
    assert event.data["reason"] == "malformed"


def test_a_bug_in_the_announcement_never_costs_the_dead_letter(
    in_memory: tuple[asyncio.Runner, InMemory], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, run = in_memory
    runner.run(run.forget())

    def bug(*_args: Any, **_kwargs: Any) -> MessageDeadLetteredV1:
        raise ValueError("a bug")

    monkeypatch.setattr("tributary.messaging.deadletters.announcement", bug)
    delivery = Delivery(body=b"{broken", headers={}, message_id="msg-bug-1")
    runner.run(run.deliver(delivery))
    assert delivery.settled == ["ack"]
    [(_exchange, _key, copy)] = run.copies.published
    assert copy.headers is not None
    assert headers.ANNOUNCEMENT not in copy.headers
    assert runner.run(announced_dead_letters(run.engine)) == []


# -- every path, on the real broker and both databases ---------------------------------------

LIMIT = 2


async def hand_back(url: str, queue: str, times: int) -> None:
    """Take the one message of ``queue`` and return it ``times`` times (as a consumer that
    crashes or loses its channel with it would)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=True)
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def took() -> bool:
            if (message := await q.get(fail=False, no_ack=False)) is not None:
                taken.append(message)
            return bool(taken)

        for _ in range(times):
            await eventually(took, what=f"the message back in {queue}")
            await taken.pop().nack(requeue=True)
    finally:
        await connection.close()


@dataclass
class Expected:
    reason: str
    attempts: int
    exception: str | None = None
    secret: str | None = None


async def test_every_dead_letter_path_announces_one_event(
    engine: AsyncEngine, broker_url: str
) -> None:
    """Malformed (twice: one event), unknown type, invalid schema, a permanent error, retries
    exhausted, a hanging handler, an idempotency conflict, the delivery limit; and a poisoned
    announcement, which announces nothing. The relay publishes each announcement."""
    settings_ = isolated_settings(
        broker_url,
        delivery_limit=LIMIT,
        inprocess_retries=2,
        handler_timeout_seconds=0.3,
        retry_tiers=(0.1, 0.2),
    )

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        match event.data.family_name:
            case "permanent":
                raise PermanentError(f"{event.data.given_name} is not welcome")
            case "flaky":
                raise RuntimeError(f"mailbox of {event.data.given_name} is full")
            case "slow":
                await asyncio.sleep(30)

    async def on_dead_letter(event: CloudEvent[MessageDeadLetteredV1], uow: UnitOfWork) -> None:
        if event.source != f"/services/{SERVICE}":  # its own come back to it, and are fine
            raise PermanentError("announcements of others are refused")

    def bus() -> Bus:
        return Bus(
            SERVICE,
            engine,
            handlers={UserCreatedV2: on_user_created, MessageDeadLetteredV1: on_dead_letter},
            settings=settings_,
        )

    expected: dict[str, Expected] = {}

    def poison(
        reason: str, attempts: int = 0, exception: str | None = None, **changes: Any
    ) -> dict[str, Any]:
        secret = f"Zqsecret{uuid.uuid4().hex[:8]}"
        event = user_created(given_name=secret, **changes)
        expected[event["id"]] = Expected(reason, attempts, exception, secret)
        return event

    every_attempt = 2 * 3  # in-process attempts per delivery x (first delivery + two tiers)
    unknown = poison("unknown_type")
    unknown["type"] = f"{NAMESPACE}.user.created.v9"
    invalid = poison("schema_invalid", email="not an address")
    permanent = poison("handler_error", 1, "PermanentError", family_name="permanent")
    flaky = poison("retries_exhausted", every_attempt, "RuntimeError", family_name="flaky")
    slow = poison("retries_exhausted", every_attempt, "HandlerTimeout", family_name="slow")
    first = user_created(idempotencykey="conflict-1")
    conflicting = poison("idempotency_conflict", 1, idempotencykey="conflict-1")
    handed_back = poison("delivery_limit", LIMIT)
    malformed = b'{"data": {"name": "Zqsecretmalformed"}, "oops"'
    dead_announcement = new_event(
        routing_key=DEAD,
        source="/services/other",
        data=MessageDeadLetteredV1.model_validate(sample(DEAD)),
    )

    declaring = bus()
    url = broker_url
    async with (
        started_bus(declaring, consume=False),
        Capture(url, declaring.names, [f"{DEAD.rpartition('.')[0]}.*"]) as wire,
    ):
        qs = queues_of(declaring)
        await publish_raw(url, declaring.names, "user.created.v2", body_of(handed_back))
        await hand_back(url, qs.work, LIMIT)
        for event in (unknown, invalid, permanent, flaky, slow, first):
            await publish_raw(url, declaring.names, routing_key_of(event), body_of(event))
        for _ in range(2):
            await publish_raw(url, declaring.names, "user.created.v2", malformed, message_id="m-1")
        await publish_raw(url, declaring.names, DEAD, dead_announcement.to_bytes())
        consuming = bus()
        async with started_bus(consuming, owns_topology=False) as outcomes:
            await outcomes.wait_until_handled(first["id"])
            await publish_raw(url, declaring.names, "user.created.v2", body_of(conflicting))
            dead_letters = len(expected) + 2 + 1
            await outcomes.wait_for_count("dead_lettered", dead_letters)
            announced = len(expected) + 1
            await wire.take(announced + 1)  # and the poisoned one the test sent
            dlq = await read_queue(url, qs.dlq, expect=dead_letters)
            assert await queue_depth(url, qs.dlq) == 0

    events = await announced_dead_letters(engine)
    assert len(events) == announced, [e.data["reason"] for e in events]
    by_message = {e.data.get("message_id"): e for e in events}
    for poisoned_id, want in expected.items():
        told = by_message.pop(poisoned_id)
        data = told.data
        assert (data["reason"], data["attempts"]) == (want.reason, want.attempts), data
        assert data.get("exception") == want.exception, data
        assert want.secret is not None
        assert want.secret not in told.to_bytes().decode()
        assert data["message_type"] in ("user.created.v2", "user.created.v9")
    [(malformed_id, malformed_event)] = by_message.items()
    assert malformed_id == "m-1"
    assert malformed_event.data["reason"] == "malformed"
    assert "Zqsecret" not in malformed_event.to_bytes().decode()
    # every announcement went out, valid, as the outbox holds it
    on_the_wire = [json.loads(m.body) for m in wire.messages]
    on_the_wire = [e for e in on_the_wire if e["id"] != dead_announcement.id]
    assert sorted(e["id"] for e in on_the_wire) == sorted(e.id for e in events)
    for sent in on_the_wire:
        validate(DEAD, sent["data"], "strict")
    # each DLQ copy names its announcement; the poisoned announcement's copy names none
    named = [c.headers.get(headers.ANNOUNCEMENT) for c in dlq]
    assert sum(1 for n in named if n is None) == 1
    assert {headers.text(n) for n in named if n is not None} == {e.id for e in events}


async def test_an_announcement_the_database_fails_pauses_the_consumer_and_loses_nothing(
    engine: AsyncEngine, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def write_thing(event: UserCreated, uow: UnitOfWork) -> None:
        return None

    bus = Bus(
        SERVICE,
        engine,
        handlers={UserCreatedV2: write_thing},
        settings=isolated_settings(broker_url, pause_probe_max_seconds=0.2),
    )
    failures: list[str] = []

    async with started_bus(bus) as outcomes:
        [consumer] = bus.consumers
        real = consumer._write_announcement

        async def fails_once(*args: Any) -> bool:
            if not failures:
                failures.append("disk I/O error")
                raise sa_exc.OperationalError("INSERT", {}, Exception("disk I/O error"))
            return await real(*args)

        monkeypatch.setattr(consumer, "_write_announcement", fails_once)
        await publish_raw(broker_url, bus.names, "user.created.v2", b"{no", message_id="m-out")
        await outcomes.wait_until_handled("m-out", "dead_lettered")
        dlq = queues_of(bus).dlq
        copies = await read_queue(broker_url, dlq, expect=2)
        assert await queue_depth(broker_url, dlq) == 0

    assert failures == ["disk I/O error"]
    assert [r.outcome for r in outcomes.of("m-out")] == ["dead_lettered"]  # acked once, after
    [event] = await announced_dead_letters(engine)
    assert event.data["reason"] == "malformed"
    assert event.data["message_id"] == "m-out"
    assert {headers.text(c.headers[headers.ANNOUNCEMENT]) for c in copies} == {event.id}
    assert event.id == event_id(idempotency_key(SERVICE, "malformed", "m-out", b"{no"))
