"""``eventctl publish``: contract-checked events for producers outside this repo.

On the real broker (a fresh name prefix, a test queue bound to the events exchange): a valid
event arrives once with its envelope, routing key and producer; anything invalid is refused
with its reasons and nothing is published. The property test feeds random JSON as --data.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from libs.contracts.tests.samples import sample
from tributary.contracts.catalog import catalog
from tributary.contracts.envelope import parse_event
from tributary.eventctl.publish import Refused, load_data, resolve_version, sender
from tributary.messaging import headers as h
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names

from .helpers import eventctl

BOUND = ("user.created.v2", "comment.mentioned.v1")


# -- without a broker -------------------------------------------------------------------------


def test_the_type_names_a_version_or_the_newest() -> None:
    assert resolve_version("user.created", None).version == max(
        catalog().type("user.created").versions
    )
    assert resolve_version("user.created", 1).routing_key == "user.created.v1"
    assert resolve_version("user.created.v1", None).version == 1
    assert resolve_version("com.tributary.user.created.v2", 2).version == 2


@pytest.mark.parametrize(
    ("name", "version", "reason"),
    [
        ("user.created.v1", 2, "names version 1, --version 2"),
        ("user.created", 99, "no version 99"),
        ("user.nope", None, "unknown event type"),
        ("email.send", None, "is a command"),
    ],
)
def test_a_type_the_catalog_does_not_have_is_refused(
    name: str, version: int | None, reason: str
) -> None:
    with pytest.raises(Refused, match=reason):
        resolve_version(name, version)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON list"),
        (b'{"a": NaN}', "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "deeper than"),
        (b"[" * 5000 + b"]" * 5000, "deeper than"),
    ],
)
def test_data_that_is_no_json_object_is_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        load_data(raw)


def test_who_may_publish_follows_the_catalog() -> None:
    mentioned = catalog().type("comment.mentioned")
    created = catalog().type("user.created")

    # a foreign producer's own broker user
    assert sender(mentioned, "comments-app", "", None).producer == "comments-app"
    assert sender(mentioned, "prod.comments-app", "prod.", None).header is None
    with pytest.raises(Refused, match=r"reports-app may not publish comment\.mentioned"):
        sender(mentioned, "reports-app", "", None)
    # the operator publishes for a producer, named in the header the sender check trusts
    as_operator = sender(created, "prod.eventctl", "prod.", "identity")
    assert (as_operator.producer, as_operator.header) == ("identity", "identity")
    with pytest.raises(Refused, match="--producer"):
        sender(created, "eventctl", "", None)
    with pytest.raises(Refused, match=r"comments-app may not publish user\.created"):
        sender(created, "eventctl", "", "comments-app")
    # another user naming a producer: allowed by the catalog, with a warning
    guest = sender(created, "guest", "", "identity")
    assert guest.header == "identity"
    assert guest.warning is not None
    assert "guest" in guest.warning


# -- against the broker -----------------------------------------------------------------------


@dataclass
class Bound:
    settings: MessagingSettings
    queue: aio_pika.abc.AbstractQueue
    tmp: Path

    def data_file(self, data: Any, name: str = "data.json") -> str:
        path = self.tmp / name
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        return str(path)

    async def take(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        got = []
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            got.append(message)
        return got


@pytest.fixture
async def bound(settings: MessagingSettings, tmp_path: Path) -> AsyncIterator[Bound]:
    """The events exchange of a fresh prefix with a queue bound to two routing keys."""
    names = Names(settings.name_prefix)
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(f"{settings.name_prefix}published")
        for key in BOUND:
            await queue.bind(exchange, key)
        try:
            yield Bound(settings, queue, tmp_path)
        finally:
            await channel.queue_delete(queue.name)
            await channel.exchange_delete(names.exchange)


@pytest.mark.broker
async def test_a_valid_event_is_published_with_its_envelope_and_producer(
    bound: Bound, capsys: pytest.CaptureFixture[str]
) -> None:
    data = sample("user.created.v2")
    code = await eventctl(
        bound.settings,
        "publish",
        "--type",
        "user.created",
        "--data",
        bound.data_file(data),
        "--producer",
        "identity",
        "--subject",
        "usr_0123456789",
        "--correlation-id",
        "req-42",
        "--id",
        "evt-1",
    )

    assert code == 0
    assert "published com.tributary.user.created.v2 evt-1" in capsys.readouterr().out
    [message] = await bound.take()
    event = parse_event(message.body)
    assert (event.id, event.type, event.subject) == (
        "evt-1",
        "com.tributary.user.created.v2",
        "usr_0123456789",
    )
    assert (event.correlationid, event.source) == ("req-42", "/services/identity")
    assert event.data == data
    assert message.routing_key == "user.created.v2"
    assert message.message_id == "evt-1"
    assert message.correlation_id == "req-42"
    assert message.user_id == "guest"
    assert (message.headers or {})[h.PRODUCER] == "identity"


@pytest.mark.broker
async def test_a_foreign_producers_event_from_stdin_style_file_and_dry_run(
    bound: Bound, capsys: pytest.CaptureFixture[str]
) -> None:
    path = bound.data_file(sample("comment.mentioned.v1"))
    args = ("publish", "--type", "comment.mentioned.v1", "--data", path)

    assert await eventctl(bound.settings, *args, "--producer", "comments-app", "--dry-run") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source"] == "/external/comments-app"
    assert await bound.take() == []  # a dry run publishes nothing

    assert await eventctl(bound.settings, *args, "--producer", "comments-app") == 0
    [message] = await bound.take()
    assert parse_event(message.body).source == "/external/comments-app"


@pytest.mark.broker
async def test_an_invalid_event_is_refused_with_every_reason_and_nothing_published(
    bound: Bound, capsys: pytest.CaptureFixture[str]
) -> None:
    data = sample("user.created.v2", user_id=5, nickname="x")
    del data["email"]
    capsys.readouterr()

    code = await eventctl(
        bound.settings,
        "publish",
        "--type",
        "user.created",
        "--data",
        bound.data_file(data),
        "--producer",
        "identity",
    )

    assert code == 2
    err = capsys.readouterr().err
    assert "invalid: data.email: is required" in err
    assert "invalid: data.user_id: is not of type 'string'" in err
    assert "invalid: data.nickname: is not allowed" in err
    assert "nothing published" in err
    assert "ada@example.com" not in err  # values are never echoed
    assert await bound.take() == []


@pytest.mark.broker
async def test_a_producer_the_catalog_does_not_allow_is_refused(
    bound: Bound, capsys: pytest.CaptureFixture[str]
) -> None:
    path = bound.data_file(sample("user.created.v2"))
    code = await eventctl(
        bound.settings, "publish", "--type", "user.created", "--data", path, "--producer", "email"
    )
    assert code == 2
    assert "email may not publish user.created" in capsys.readouterr().err
    assert await bound.take() == []


@pytest.mark.broker
async def test_an_event_no_queue_takes_is_an_error(
    bound: Bound, capsys: pytest.CaptureFixture[str]
) -> None:
    path = bound.data_file(sample("report.ready.v1"))
    code = await eventctl(
        bound.settings,
        "publish",
        "--type",
        "report.ready",
        "--data",
        path,
        "--producer",
        "reports-app",
    )
    assert code == 2
    assert "no queue bound to 'report.ready.v1'" in capsys.readouterr().err


@pytest.mark.broker
async def test_a_missing_data_file_is_refused(
    bound: Bound, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(bound.tmp / "nope.json")
    code = await eventctl(bound.settings, "publish", "--type", "user.created", "--data", missing)
    assert code == 2
    assert "No such file" in capsys.readouterr().err


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


def _mutated(draw: st.DrawFn) -> Any:
    """A valid user.created.v2 payload with some fields removed, replaced or added."""
    data = sample("user.created.v2")
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del data[key]
        else:
            data[key] = draw(json_values)
    if draw(st.booleans()):
        data[draw(st.text(max_size=10))] = draw(json_values)
    return data


@st.composite
def data_files(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["valid", "mutated", "random", "text"]))
    if kind == "valid":
        return json.dumps(sample("user.created.v2"))
    if kind == "mutated":
        return json.dumps(_mutated(draw))
    if kind == "random":
        return json.dumps(draw(json_values))
    return draw(st.text(max_size=60))


@pytest.mark.broker
async def test_any_data_file_is_published_valid_or_refused_with_a_reason(
    bound: Bound, capsys: pytest.CaptureFixture[str]
) -> None:
    """Random JSON (and not JSON) as --data, run from a worker thread on the test's loop:
    never a traceback; exit 0 and one message, or exit 2 with a reason and none."""
    outcomes: list[int] = []

    @hypothesis_settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(content=data_files())
    @example(content=json.dumps(sample("user.created.v2")))
    @example(content='{"user_id": "\\ud800"}')
    def one(content: str) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            fh.write(content)
        capsys.readouterr()
        code = asyncio.run_coroutine_threadsafe(
            eventctl(
                bound.settings,
                "publish",
                "--type",
                "user.created.v2",
                "--data",
                fh.name,
                "--producer",
                "identity",
            ),
            loop,
        ).result(timeout=30)
        Path(fh.name).unlink()
        captured = capsys.readouterr()
        assert code in (0, 2), code
        if code == 2:
            assert "eventctl: " in captured.err
            assert "nothing published" in captured.err
        else:
            assert "confirmed" in captured.out
        outcomes.append(code)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(one)

    published = await bound.take()
    assert len(published) == outcomes.count(0)
    assert outcomes.count(0) >= 1  # the valid sample is an example
    for message in published:
        parse_event(message.body)  # every published event is a valid CloudEvent
