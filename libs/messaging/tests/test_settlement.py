"""Every delivery is settled exactly once, whatever arrives: the real consumer, broker and database.

Messages are published straight to the work queue, the way a buggy or hostile producer (or an
operator with a shovel) could: any body, content type, headers and CloudEvent attributes. Each
one must end handled (its row committed) or in the DLQ with a reason, never both, never neither,
and the consumer must keep consuming. The named tests cover each known way a delivery used to
slip through: parser limits, non-ASCII version digits, a raising upcaster, an exception nothing
expected, a failed publish to the DLQ or a retry queue, and a multiple-ack over an unsettled tag.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, get_args

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import field_validator
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select

from libs.contracts.tests.samples import sample
from tributary.contracts import upcasting
from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.envelope import CONTENT_TYPE, MAX_BODY_BYTES, CloudEvent
from tributary.contracts.events import UserCreatedV2
from tributary.contracts.validation import validate
from tributary.messaging import headers
from tributary.messaging.bus import Bus
from tributary.messaging.deadletters import body_words
from tributary.messaging.errors import DlqReason, PermanentError
from tributary.messaging.testing import (
    DlqMessage,
    OutcomeRecorder,
    announced_dead_letters,
    isolated_settings,
    queue_depth,
    read_queue,
    started_bus,
)
from tributary.messaging.topology import declare_queue_set
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.waiting import eventually

from .conftest import Thing
from .helpers import queues_of

pytestmark = pytest.mark.broker

SERVICE = "settle"
REASONS = frozenset(get_args(DlqReason))
TOKEN_LENGTH = 16
UserCreated = CloudEvent[UserCreatedV2]


def new_token() -> str:
    """A fresh AMQP ``message_id``; a handled event's id starts with it."""
    return uuid.uuid4().hex[:TOKEN_LENGTH]


# -- what a producer can put on the wire ---------------------------------------------------------


class NotUtf8(str):
    """A header value that goes out as a long string that is not UTF-8 (as other clients can)."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe not utf-8 \xc3"


@dataclass(frozen=True)
class Template:
    """One message to publish, independent of the run (its token is added at publish time).

    ``envelope`` is a CloudEvent as a dict (``id_suffix`` set: its id becomes token + suffix, a
    string idempotency key is prefixed with the token); otherwise ``body`` goes out as it is.
    """

    kind: str
    body: bytes = b""
    envelope: Mapping[str, Any] | None = None
    id_suffix: str | None = ""
    ascii_only: bool = True
    content_type: str | None = CONTENT_TYPE
    headers: Mapping[str, Any] = field(default_factory=dict)
    valid: bool = False
    """A well-formed event the consumer must process."""
    reason: str | None = None
    """The DLQ reason it must get, when the template says (``None``: any, or processed)."""

    def build(self, token: str) -> Sent:
        body = self.body
        if self.envelope is not None:
            event = dict(self.envelope)
            if self.id_suffix is not None:
                event["id"] = token + self.id_suffix
            if isinstance(event.get("idempotencykey"), str):
                event["idempotencykey"] = token + event["idempotencykey"]
            text = json.dumps(event, ensure_ascii=self.ascii_only, allow_nan=True)
            body = text.encode("utf-8", "surrogatepass")
        return Sent(token, body, self)


@dataclass(frozen=True)
class Sent:
    token: str
    body: bytes
    template: Template

    def message(self) -> aio_pika.Message:
        return aio_pika.Message(
            self.body,
            content_type=self.template.content_type,
            headers=dict(self.template.headers),
            message_id=self.token,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )


def user_created_envelope(version: int = 2, **data: Any) -> dict[str, Any]:
    """A valid ``user.created.v<version>`` envelope (its id is set from the token)."""
    routing_key = f"user.created.v{version}"
    return {
        "specversion": "1.0",
        "id": "",
        "type": f"{NAMESPACE}.{routing_key}",
        "source": "/external/settlement-tests",
        "time": "2026-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "data": sample(routing_key, **data),
    }


def valid(**data: Any) -> Template:
    return Template("valid", envelope=user_created_envelope(**data), valid=True)


def raw(kind: str, body: bytes, reason: str | None = "malformed") -> Template:
    return Template(kind, body=body, reason=reason)


def with_type(ce_type: str, reason: str = "unknown_type") -> Template:
    envelope = user_created_envelope()
    envelope["type"] = ce_type
    return Template(f"type {ce_type}", envelope=envelope, reason=reason)


class Producer:
    """Publishes straight to a queue through the default exchange, confirmed, on one channel."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> Producer:
        self._connection = await aio_pika.connect(self._url)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def publish(self, queue: str, burst: Iterable[Sent]) -> None:
        assert self._channel is not None
        exchange = self._channel.default_exchange
        await asyncio.gather(*(exchange.publish(s.message(), queue, mandatory=True) for s in burst))

    async def ready(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not those a consumer holds)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await channel.close()


class DeadLetters:
    """Takes (and acks) every copy that reaches a DLQ while the test runs."""

    def __init__(self, url: str, queue: str) -> None:
        self._url = url
        self._queue_name = queue
        self._connection: AbstractConnection | None = None
        self._queue: AbstractQueue | None = None
        self.messages: list[DlqMessage] = []

    async def __aenter__(self) -> DeadLetters:
        self._connection = await aio_pika.connect(self._url)
        channel = await self._connection.channel()
        self._queue = await channel.declare_queue(self._queue_name, passive=True)
        await self._queue.consume(self._take)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _take(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(
            DlqMessage(
                body=message.body,
                headers=dict(message.headers or {}),
                message_id=message.message_id,
                routing_key=message.routing_key,
            )
        )
        await message.ack()

    def of(self, token: str) -> list[DlqMessage]:
        return [m for m in self.messages if m.message_id == token]


# -- the consumer under test ---------------------------------------------------------------------


async def handled_tokens(engine: AsyncEngine) -> Counter[str]:
    """Committed handler rows per token (a handled event's id starts with its token)."""
    async with engine.connect() as conn:
        ids = (await conn.execute(select(Thing.event_id))).scalars().all()
    return Counter(event_id[:TOKEN_LENGTH] for event_id in ids)


@dataclass
class Harness:
    bus: Bus
    engine: AsyncEngine
    outcomes: OutcomeRecorder
    dead: DeadLetters
    producer: Producer

    @property
    def work_queue(self) -> str:
        return queues_of(self.bus).work

    async def send(self, bursts: Sequence[Sequence[Template]]) -> list[Sent]:
        """Publish each burst at once, bursts back to back, without waiting for outcomes."""
        sent: list[Sent] = []
        for burst in bursts:
            built = [template.build(new_token()) for template in burst]
            await self.producer.publish(self.work_queue, built)
            sent.extend(built)
        return sent

    async def settle(self, sent: Sequence[Sent], *, timeout: float = 30.0) -> Counter[str]:
        """Wait until every message is handled or dead-lettered; the handled counts."""
        handled: Counter[str] = Counter()

        async def all_accounted() -> bool:
            nonlocal handled
            handled = await handled_tokens(self.engine)
            dead = {m.message_id for m in self.dead.messages}
            return all(s.token in handled or s.token in dead for s in sent)

        try:
            await eventually(all_accounted, timeout=timeout, what="every message settled")
        except TimeoutError:
            dead = {m.message_id for m in self.dead.messages}
            missing = [s for s in sent if s.token not in handled and s.token not in dead]
            lines = [f"{s.template.kind}: {s.body[:120]!r}" for s in missing]
            raise AssertionError(
                f"{len(missing)} message(s) never settled:\n" + "\n".join(lines)
            ) from None
        return handled

    def assert_exactly_once(self, sent: Sequence[Sent], handled: Counter[str]) -> None:
        for s in sent:
            copies = self.dead.of(s.token)
            what = f"{s.template.kind} {s.body[:120]!r}"
            assert handled[s.token] + len(copies) == 1, f"{what}: handled and dead-lettered"
            if s.template.valid:
                assert handled[s.token] == 1, f"{what}: a valid event was not handled"
            for copy in copies:
                assert copy.reason in REASONS, f"{what}: DLQ copy without a runtime reason"
                assert copy.body == s.body, f"{what}: DLQ copy changed the body"
                if s.template.reason is not None:
                    assert copy.reason == s.template.reason, what

    async def assert_announced(self) -> None:
        """Every DLQ copy names its ``message.dead_lettered`` event, written once into the
        outbox: valid, with the copy's reason, no word of the message's own text in its error.
        """
        announced = {e.id: e for e in await announced_dead_letters(self.engine)}
        named = set()
        for copy in self.dead.messages:
            event_id = headers.text(copy.headers[headers.ANNOUNCEMENT])
            named.add(event_id)
            event = announced[event_id]
            validate("message.dead_lettered.v1", event.data, "strict")
            assert event.data["reason"] == copy.reason
            assert event.data["consumer"] == self.bus.service
            assert event.data["attempts"] == int(headers.text(copy.headers[headers.ATTEMPTS]))
            words = {w.casefold() for w in re.findall(r"\w+", event.data["error"])}
            assert not words & body_words(copy.body), (event.data["error"], copy.body[:200])
        assert set(announced) == named, "an announcement of no dead letter"


async def write_thing(event: UserCreated, uow: UnitOfWork) -> None:
    uow.session.add(Thing(event_id=event.id, user_id=event.data.user_id))


@pytest.fixture
async def harness(
    request: pytest.FixtureRequest, engine: AsyncEngine, broker_url: str
) -> AsyncIterator[Harness]:
    """One bus for the whole test (hypothesis examples share it; each uses fresh tokens).

    Indirect parameter: the service name (``email`` handles user.created one per transaction).
    """
    service: str = getattr(request, "param", SERVICE)
    settings_ = isolated_settings(broker_url)
    bus = Bus(service, engine, handlers={UserCreatedV2: write_thing}, settings=settings_)
    async with (
        started_bus(bus) as outcomes,
        DeadLetters(broker_url, queues_of(bus).dlq) as dead,
        Producer(broker_url) as producer,
    ):
        yield Harness(bus, engine, outcomes, dead, producer)


# -- strategies ------------------------------------------------------------------------------------

AMQP_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
"""Text an AMQP string can carry (no lone surrogates)."""
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=24)
SAFE_TEXT = st.text(st.characters(exclude_categories=("Cc", "Cs", "Cn")), max_size=24)
"""Text a CloudEvents string attribute may hold (no controls, surrogates, noncharacters)."""

RUNTIME_HEADERS = [
    headers.ATTEMPTS,
    headers.RETRIES,
    headers.REPLAY,
    headers.REPLAY_FORCED,
    headers.ROUTING_KEY,
    headers.FIRST_FAILURE,
    headers.LAST_FAILURE,
    headers.REASON,
    headers.ERROR,
    headers.EXCEPTION,
    headers.CONSUMER,
    "traceparent",
    "tracestate",
]
header_values: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        ["١٢", "²", "-1", "9" * 40, str(2**63 - 1), "maybe", "", "NaN", "1e3", " 1", "\x00"]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.none(),
    # NaN or infinity: RabbitMQ 3.10 closes the publisher's connection (541), nothing queued
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    AMQP_TEXT,
    st.binary(max_size=8).map(bytearray),
    st.just(NotUtf8("x")),
    st.lists(AMQP_TEXT, max_size=3),
    st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), AMQP_TEXT, max_size=3),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1)),
)
BROKER_OWNED = ("x-death", "x-delivery-count", "x-first-death", "x-last-death")
amqp_headers = st.dictionaries(
    st.sampled_from(RUNTIME_HEADERS)
    | st.from_regex(r"[a-zA-Z0-9._-]{1,20}", fullmatch=True).filter(
        lambda name: not name.startswith(BROKER_OWNED)
    ),
    header_values,
    max_size=5,
)
content_types = st.one_of(
    st.none(),
    st.just(CONTENT_TYPE),
    st.sampled_from(["application/json", "text/plain", "application/cloudevents-batch+json"]),
    AMQP_TEXT,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(ANY_TEXT, children, max_size=3)
    ),
    max_leaves=12,
)
extensions = st.dictionaries(
    st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True).filter(
        lambda n: n not in user_created_envelope()
    ),
    SAFE_TEXT | st.integers(-(2**31), 2**31 - 1) | st.booleans(),
    max_size=3,
)


@st.composite
def valid_events(draw: st.DrawFn) -> Template:
    """A well-formed user.created (v2, or v1 to upcast) with odd but legal content."""
    version = draw(st.sampled_from([2, 2, 1]))
    names: dict[str, Any]
    if version == 2:
        names = {
            "given_name": draw(st.text(min_size=1, max_size=60)),
            "family_name": draw(st.text(max_size=60)),
        }
    else:
        names = {"name": draw(st.text(min_size=1, max_size=60).filter(str.strip))}
    envelope = user_created_envelope(version, **names)
    envelope.update(draw(extensions))
    if draw(st.booleans()):
        envelope["idempotencykey"] = draw(SAFE_TEXT)
    envelope["time"] = draw(
        st.sampled_from(
            [
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:00:00.123456+14:00",
                "1999-12-31T23:59:59-12:00",
            ]
        )
    )
    return Template(
        "valid",
        envelope=envelope,
        id_suffix=draw(SAFE_TEXT),
        ascii_only=draw(st.booleans()),
        headers=draw(amqp_headers),
        valid=True,
    )


@st.composite
def mutated_events(draw: st.DrawFn) -> Template:
    """A user.created with attributes replaced, removed or added: valid or not, it settles."""
    envelope = user_created_envelope()
    id_suffix: str | None = draw(ANY_TEXT)
    for name in draw(st.lists(st.sampled_from(sorted(envelope)), max_size=3, unique=True)):
        if name == "id":
            id_suffix = None  # the id itself is junk (not a string) or gone: never handled
            values = json_values.filter(lambda v: not isinstance(v, str))
        else:
            values = json_values
        if draw(st.booleans()):
            envelope[name] = draw(values)
        else:
            del envelope[name]
    for _ in range(draw(st.integers(0, 2))):
        envelope[draw(ANY_TEXT.filter(lambda n: n != "id"))] = draw(json_values)
    return Template(
        "mutated",
        envelope=envelope,
        id_suffix=id_suffix,
        ascii_only=draw(st.booleans()),
        content_type=draw(content_types),
        headers=draw(amqp_headers),
    )


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


KNOWN_BAD = [
    raw("not utf-8", b"\xff\xfe{not json"),
    raw("not json", b"{nope"),
    raw("empty", b""),
    raw("json array", b"[1, 2]"),
    raw("deep nesting", _nested(100_000)),
    raw("int over 4300 digits", b'{"data": {"n": 1' + b"0" * 5000 + b"}}"),
    raw("nan", b'{"data": {"n": NaN}}'),
    with_type(f"{NAMESPACE}.user.created.v\u00b2"),
    with_type(f"{NAMESPACE}.user.created.v\u0662"),
    with_type(f"{NAMESPACE}.user.created.v02"),
    with_type(f"{NAMESPACE}.user.deleted.v1"),
    Template(
        "v2 type, v1 data",
        envelope=user_created_envelope(1) | {"type": f"{NAMESPACE}.user.created.v2"},
        reason="schema_invalid",
    ),
]


@st.composite
def invalid_messages(draw: st.DrawFn) -> Template:
    template = draw(
        st.one_of(
            st.sampled_from(KNOWN_BAD),
            st.binary(max_size=300).map(lambda b: raw("bytes", b, reason=None)),
            json_values.map(
                lambda v: raw("json", json.dumps(v).encode("utf-8", "surrogatepass"), None)
            ),
            mutated_events(),
        )
    )
    if template.kind == "mutated":
        return template
    return Template(
        template.kind,
        body=template.body,
        envelope=template.envelope,
        content_type=draw(content_types),
        headers=draw(amqp_headers),
        reason=template.reason,
    )


bursts = st.lists(
    st.lists(st.one_of(valid_events(), invalid_messages()), min_size=1, max_size=6),
    min_size=1,
    max_size=3,
)


# -- the property --------------------------------------------------------------------------------


@settings(
    max_examples=30,
    deadline=None,
    # no shrinking: a lost message makes each shrink step wait for the settle timeout
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one bus for all examples, on purpose
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(bursts=bursts, last=valid_events())
@pytest.mark.parametrize(
    "harness",
    [
        pytest.param(SERVICE, id="grouped"),
        # the catalog marks user.created irreversible for email: one delivery per transaction
        pytest.param("email", id="one-per-transaction"),
    ],
    indirect=True,
)
async def test_every_message_is_handled_or_dead_lettered_exactly_once(
    harness: Harness, bursts: list[list[Template]], last: Template
) -> None:
    sent = await harness.send(bursts)
    sent += await harness.send([[last]])  # the consumer is still consuming after all that
    handled = await harness.settle(sent)
    harness.assert_exactly_once(sent, handled)
    await harness.assert_announced()
    assert await harness.producer.ready(harness.work_queue) == 0


# -- one test per known trigger ----------------------------------------------------------------


async def test_parser_limits_are_malformed_and_their_neighbours_processed(
    harness: Harness,
) -> None:
    too_big = b'{"data": {}, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    bad = [
        raw("deep nesting", _nested(100_000)),
        raw("deep object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        raw("depth 33", json.dumps(user_created_envelope() | {"data": _deep_dict(31)}).encode()),
        raw("int over 4300 digits", b'{"data": {"n": 1' + b"0" * 5000 + b"}}"),
        raw("infinity", b'{"data": {"n": -Infinity}}'),
        raw("lone surrogate", b'{"data": {"s": "\\udc00"}}'),
        raw("over 1 MiB", too_big),
    ]
    interleaved = [t for b in bad for t in (valid(), b)] + [valid()]
    sent = await harness.send([interleaved])
    handled = await harness.settle(sent)
    harness.assert_exactly_once(sent, handled)
    await harness.assert_announced()


def _deep_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_a_version_in_non_ascii_digits_is_an_unknown_type(harness: Harness) -> None:
    odd = [
        with_type(f"{NAMESPACE}.user.created.v\u00b2"),  # superscript two
        with_type(f"{NAMESPACE}.user.created.v\u0662"),  # Arabic-Indic two
        with_type(f"{NAMESPACE}.user.created.v\uff12"),  # fullwidth two
        with_type(f"{NAMESPACE}.user.created.v\u0968"),  # Devanagari two
    ]
    sent = await harness.send([[valid(), *odd, valid()]])
    handled = await harness.settle(sent)
    harness.assert_exactly_once(sent, handled)
    for s in sent[1:-1]:
        [copy] = harness.dead.of(s.token)
        assert "not a versioned routing key" in headers.text(copy.headers[headers.ERROR])


async def test_an_upcaster_that_raises_is_reported_as_upcast_failed(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = upcasting._UPCASTERS[("user.created", 1)]

    def broken_for_one_name(data: dict[str, Any]) -> dict[str, Any]:
        if data.get("name") == "Upcast Boom":
            raise TypeError("upcaster bug")  # not a KeyError: no "missing upcaster" confusion
        return real(data)

    monkeypatch.setitem(upcasting._UPCASTERS, ("user.created", 1), broken_for_one_name)
    boom = Template(
        "v1 the upcaster trips over",
        envelope=user_created_envelope(1, name="Upcast Boom"),
        reason="upcast_failed",
    )
    v1 = Template("v1", envelope=user_created_envelope(1, name="Ada Lovelace"), valid=True)
    sent = await harness.send([[v1, boom, valid()]])
    handled = await harness.settle(sent)
    harness.assert_exactly_once(sent, handled)
    [copy] = harness.dead.of(sent[1].token)
    assert "TypeError" in headers.text(copy.headers[headers.ERROR])
    await harness.assert_announced()


TOUCHY = "Touchy"


class TouchyUserCreated(UserCreatedV2):
    """A payload model with a bug: its validator raises TypeError for one given name."""

    @field_validator("given_name")
    @classmethod
    def _trip(cls, value: str) -> str:
        if value == TOUCHY:
            raise TypeError("validator bug")  # pydantic passes TypeError through unwrapped
        return value


async def write_touchy(event: CloudEvent[TouchyUserCreated], uow: UnitOfWork) -> None:
    uow.session.add(Thing(event_id=event.id, user_id=event.data.user_id))


@pytest.fixture
async def touchy(engine: AsyncEngine, broker_url: str) -> AsyncIterator[Harness]:
    """A bus whose payload model raises an exception nothing in the runtime expects."""
    bus = Bus(
        SERVICE,
        engine,
        handlers={TouchyUserCreated: write_touchy},
        settings=isolated_settings(broker_url),
    )
    async with (
        started_bus(bus) as outcomes,
        DeadLetters(broker_url, queues_of(bus).dlq) as dead,
        Producer(broker_url) as producer,
    ):
        yield Harness(bus, engine, outcomes, dead, producer)


def touchy_event() -> Template:
    return Template(
        "touchy",
        envelope=user_created_envelope(given_name=TOUCHY),
        reason="unexpected_error",
    )


async def test_an_unexpected_exception_dead_letters_that_message_alone(touchy: Harness) -> None:
    sent = await touchy.send([[valid(), touchy_event(), valid()], [touchy_event(), valid()]])
    handled = await touchy.settle(sent)
    touchy.assert_exactly_once(sent, handled)
    for s in sent:
        if s.template.kind == "touchy":
            [copy] = touchy.dead.of(s.token)
            assert headers.text(copy.headers[headers.EXCEPTION]) == "TypeError"
    await touchy.assert_announced()
    reasons = [e.data["reason"] for e in await announced_dead_letters(touchy.engine)]
    assert reasons == ["unexpected_error", "unexpected_error"]


@pytest.mark.parametrize(
    ("poison_at", "concurrency"),
    [
        pytest.param(0, 1, id="first"),
        pytest.param(17, 1, id="middle"),
        pytest.param(39, 1, id="last"),
        pytest.param(17, 3, id="middle-3-workers"),
    ],
)
async def test_a_multiple_ack_never_covers_an_unsettled_delivery(
    engine: AsyncEngine, broker_url: str, poison_at: int, concurrency: int
) -> None:
    """A backlog is consumed in grouped batches; one delivery in it fails unexpectedly."""
    sessions: list[int] = []

    async def handler(event: CloudEvent[TouchyUserCreated], uow: UnitOfWork) -> None:
        sessions.append(id(uow.session))
        await write_touchy(event, uow)

    settings_ = isolated_settings(broker_url, concurrency=concurrency)

    def new_bus() -> Bus:
        return Bus(SERVICE, engine, handlers={TouchyUserCreated: handler}, settings=settings_)

    backlog = [valid() for _ in range(40)]
    backlog[poison_at] = touchy_event()
    declaring = new_bus()
    async with started_bus(declaring, consume=False), Producer(broker_url) as producer:
        sent = [t.build(new_token()) for t in backlog]
        await producer.publish(queues_of(declaring).work, sent)  # waiting before anyone consumes
        consuming = new_bus()
        async with (
            started_bus(consuming, owns_topology=False) as outcomes,
            DeadLetters(broker_url, queues_of(consuming).dlq) as dead,
        ):
            run = Harness(consuming, engine, outcomes, dead, producer)
            handled = await run.settle(sent)
            run.assert_exactly_once(sent, handled)
            await consuming.stop()
            assert await producer.ready(queues_of(consuming).work) == 0
    assert max(Counter(sessions).values()) > 1, "no batch was grouped: nothing was tested"


# -- a publish to the DLQ or a retry queue that fails -----------------------------------------


async def consumer_noticed(bus: Bus, outcomes: OutcomeRecorder, token: str) -> bool:
    """The consumer handed the delivery back, or says it is not ready (paused)."""
    if any(r.outcome == "requeued" for r in outcomes.records):
        return True
    health = getattr(bus, "health", None)
    if health is None:
        return False
    checks: Mapping[str, tuple[bool, str | None]] = await health()
    return not all(ok for ok, _reason in checks.values())


async def redeclare(bus: Bus) -> None:
    """Declare the bus's queues again (what an operator or a restarted service does)."""
    connection = await aio_pika.connect(bus.settings.rabbitmq_url)
    try:
        await declare_queue_set(
            connection,
            bus.names,
            queues_of(bus),
            binding_keys=["user.created.*"],
            tier_seconds=bus.settings.retry_tiers,
            delivery_limit=bus.settings.delivery_limit,
        )
    finally:
        await connection.close()


async def delete_queue(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    finally:
        await connection.close()


async def test_a_dlq_publish_that_fails_loses_nothing(engine: AsyncEngine, broker_url: str) -> None:
    bus = Bus(
        SERVICE,
        engine,
        handlers={UserCreatedV2: write_thing},
        settings=isolated_settings(broker_url),
    )
    async with started_bus(bus) as outcomes, Producer(broker_url) as producer:
        queues = queues_of(bus)
        await delete_queue(broker_url, queues.dlq)  # the DLQ copy is now unroutable
        malformed = raw("not json", b"{nope").build(new_token())
        neighbours = [valid().build(new_token()) for _ in range(2)]
        await producer.publish(queues.work, [neighbours[0], malformed, neighbours[1]])

        await eventually(
            lambda: consumer_noticed(bus, outcomes, malformed.token),
            timeout=30,
            what="the consumer noticing the DLQ publish failed",
        )
        assert not outcomes.of(malformed.token, "dead_lettered"), "acked without a DLQ copy"

        await redeclare(bus)  # the DLQ is back: the held or requeued delivery gets there
        [copy] = await read_queue(broker_url, queues.dlq, timeout=60)
        assert copy.message_id == malformed.token
        assert copy.reason in {"malformed", "delivery_limit"}
        assert copy.body == malformed.body
        await eventually(
            lambda: _handled(engine, neighbours), timeout=60, what="the neighbours handled"
        )
        await bus.stop()
        assert await queue_depth(broker_url, queues.work) == 0


async def test_a_retry_publish_that_fails_loses_nothing(
    engine: AsyncEngine, broker_url: str
) -> None:
    settings_ = isolated_settings(broker_url)
    calls = 0
    flaky_id = ""

    async def flaky(event: UserCreated, uow: UnitOfWork) -> None:
        nonlocal calls
        if event.id == flaky_id:
            calls += 1
            if calls <= settings_.inprocess_retries:  # the in-process attempts all fail
                raise ConnectionError("smtp hiccup")
        await write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: flaky}, settings=settings_)
    async with started_bus(bus) as outcomes, Producer(broker_url) as producer:
        queues = queues_of(bus)
        await delete_queue(broker_url, queues.retries[0])  # the retry copy is now unroutable
        first = valid().build(new_token())
        flaky_id = first.token
        await producer.publish(queues.work, [first])  # alone: no group commit in between

        await eventually(
            lambda: consumer_noticed(bus, outcomes, first.token),
            timeout=30,
            what="the consumer noticing the retry publish failed",
        )
        assert not await _handled(engine, [first])
        await redeclare(bus)
        neighbour = valid().build(new_token())
        await producer.publish(queues.work, [neighbour])
        await eventually(
            lambda: _handled(engine, [first, neighbour]), timeout=60, what="both handled"
        )
        await bus.stop()
        assert await queue_depth(broker_url, queues.work) == 0
        assert await queue_depth(broker_url, queues.dlq) == 0
    assert calls > settings_.inprocess_retries


async def _handled(engine: AsyncEngine, sent: Sequence[Sent]) -> bool:
    handled = await handled_tokens(engine)
    return all(handled[s.token] == 1 for s in sent)


# -- headers the runtime cannot simply copy -----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(2**63 - 1, id="attempts-int64-max"),
        pytest.param(str(2**63 - 1), id="attempts-int64-max-text"),
        pytest.param("\u0661\u0662", id="attempts-arabic-indic-12"),
        pytest.param("9" * 40, id="attempts-40-digits"),
        pytest.param(-5, id="attempts-negative"),
    ],
)
async def test_junk_attempt_counts_still_reach_the_dlq(
    engine: AsyncEngine, broker_url: str, value: Any
) -> None:
    async def refuse(event: UserCreated, uow: UnitOfWork) -> None:
        raise PermanentError("this user may not sign up")

    bus = Bus(
        SERVICE, engine, handlers={UserCreatedV2: refuse}, settings=isolated_settings(broker_url)
    )
    async with (
        started_bus(bus) as outcomes,
        DeadLetters(broker_url, queues_of(bus).dlq) as dead,
        Producer(broker_url) as producer,
    ):
        run = Harness(bus, engine, outcomes, dead, producer)
        refused = Template(
            "refused",
            envelope=user_created_envelope(),
            headers={headers.ATTEMPTS: value, headers.REPLAY: "maybe"},
            reason="handler_error",
        )
        sent = await run.send([[refused]])
        handled = await run.settle(sent)
        run.assert_exactly_once(sent, handled)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(NotUtf8("x"), id="long-string-not-utf8"),
        pytest.param(bytearray(b"\x00\xff"), id="byte-array"),
        pytest.param({"nested": {"deeper": ["a", 1, None]}}, id="nested-table"),
        pytest.param(1.5, id="float"),
        pytest.param(datetime(2026, 1, 1, tzinfo=UTC), id="timestamp"),
        pytest.param(None, id="void"),
    ],
)
async def test_headers_of_any_amqp_type_neither_block_nor_lose_a_message(
    harness: Harness, value: Any
) -> None:
    odd = {"x-foreign": value, headers.ROUTING_KEY: value, headers.FIRST_FAILURE: value}
    handled_one = Template("valid", envelope=user_created_envelope(), headers=odd, valid=True)
    malformed = Template("not json", body=b"{nope", headers=odd, reason="malformed")
    sent = await harness.send([[handled_one, malformed, valid()]])
    handled = await harness.settle(sent)
    harness.assert_exactly_once(sent, handled)
