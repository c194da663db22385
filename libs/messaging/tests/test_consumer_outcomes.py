"""Every way a delivery can end, against the real broker and both databases.

Events arrive as a foreign producer sends them (raw CloudEvent bytes on the exchange); the
tests wait for the outcomes the runtime reports and then look at the database, the work
queue and the DLQ.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.envelope import CONTENT_TYPE, CloudEvent
from tributary.contracts.events import UserCreatedV2, WorkspaceCreatedV1
from tributary.messaging import PermanentError, context, headers
from tributary.messaging.bus import Bus
from tributary.messaging.context import MessageContext
from tributary.messaging.db import InboxRow, OutboxRow
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import (
    DlqMessage,
    OutcomeRecorder,
    isolated_settings,
    publish_raw,
    queue_depth,
    read_queue,
    started_bus,
)
from tributary.messaging.uow import UnitOfWork

from .conftest import Thing
from .helpers import (
    body_of,
    publish_events,
    queues_of,
    routing_key_of,
    things_count,
    user_created,
)

pytestmark = pytest.mark.broker

SERVICE = "probe"
UserCreated = CloudEvent[UserCreatedV2]


@dataclass(frozen=True)
class Call:
    event: UserCreated
    session: AsyncSession
    context: MessageContext
    is_replay: bool


class Handled:
    """What a test's handler was called with, in order."""

    # Holding every session keeps it alive, so ``id(session)`` names one transaction.

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def record(self, event: UserCreated, uow: UnitOfWork) -> int:
        """Note a call; returns how many times this event's handler has now been called."""
        self.calls.append(Call(event, uow.session, context.current(), uow.is_replay))
        return len(self.of(event.id))

    def of(self, event_id: str) -> list[Call]:
        return [c for c in self.calls if c.event.id == event_id]

    def per_transaction(self) -> list[int]:
        """Handler calls per transaction (per session), in order of the transactions."""
        return list(Counter(id(c.session) for c in self.calls).values())


def write_thing(event: UserCreated, uow: UnitOfWork) -> None:
    uow.session.add(Thing(event_id=event.id, user_id=event.data.user_id))


@pytest.fixture
def settings(broker_url: str) -> MessagingSettings:
    return isolated_settings(broker_url)


async def publish(url: str, bus: Bus, event: dict[str, Any], **kwargs: Any) -> None:
    await publish_raw(
        url, bus.names, routing_key_of(event), body_of(event), message_id=event["id"], **kwargs
    )


async def left_in_work_queue(bus: Bus) -> int:
    """Stop the bus (unsettled deliveries go back to the queue), then count what waits there."""
    await bus.stop()
    return await queue_depth(bus.settings.rabbitmq_url, queues_of(bus).work)


async def thing_ids(engine: AsyncEngine) -> list[str]:
    async with AsyncSession(engine) as session:
        return list((await session.exec(select(Thing.event_id))).all())


async def inbox(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with AsyncSession(engine) as session:
        return list((await session.exec(select(InboxRow.key, InboxRow.event_id))).all())


def header(message: DlqMessage, name: str) -> str:
    return headers.text(message.headers[name])


def outcomes_of(outcomes: OutcomeRecorder, event_id: str) -> list[str]:
    return [r.outcome for r in outcomes.of(event_id)]


async def wait_for_settled(outcomes: OutcomeRecorder, n: int) -> None:
    await outcomes.wait(
        lambda: len(outcomes.records) >= n, timeout=60.0, what=f"{n} settled deliveries"
    )


# -- processed, duplicate, conflict ------------------------------------------------------------


async def test_a_foreign_user_created_is_handled_once_and_leaves_the_work_queue(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created()
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, event)
        await outcomes.wait_until_handled(event["id"])
        assert await left_in_work_queue(bus) == 0

    assert len(handled.calls) == 1
    assert outcomes_of(outcomes, event["id"]) == ["processed"]
    assert await thing_ids(engine) == [event["id"]]
    assert await inbox(engine) == [(f"{event['type']}:{event['id']}", event["id"])]


async def test_the_same_event_published_ten_times_makes_one_thing(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created(idempotencykey="signup-ada-1")
    async with started_bus(bus) as outcomes:
        await publish_events(broker_url, bus.names, [event] * 10)
        await wait_for_settled(outcomes, 10)

    assert Counter(outcomes_of(outcomes, event["id"])) == {"processed": 1, "duplicate": 9}
    assert len(handled.calls) == 1
    assert await thing_ids(engine) == [event["id"]]
    assert await inbox(engine) == [("signup-ada-1", event["id"])]


async def test_a_reused_idempotency_key_with_another_payload_is_dead_lettered(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    first = user_created(idempotencykey="signup-ada-2")
    second = user_created(idempotencykey="signup-ada-2", given_name="Augusta")
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, first)
        await outcomes.wait_until_handled(first["id"])
        await publish(broker_url, bus, second)
        [dead] = await read_queue(broker_url, queues_of(bus).dlq)
        await outcomes.wait_until_handled(second["id"], "dead_lettered")

    assert dead.reason == "idempotency_conflict"
    assert dead.message_id == second["id"]
    assert dead.body == body_of(second)
    assert [c.event.id for c in handled.calls] == [first["id"]]
    assert await thing_ids(engine) == [first["id"]]
    assert await inbox(engine) == [("signup-ada-2", first["id"])]


# -- rejected before any handler runs ---------------------------------------------------------


def _unknown_version() -> dict[str, Any]:
    event = user_created()
    event["type"] = "com.tributary.user.created.v9"  # the work queue binds user.created.*
    return event


_NOT_JSON = b"\xff\xfe{not json at all"
_NOT_A_CLOUDEVENT = b'{"hello":"world","data":{}}'
_UNKNOWN_TYPE = body_of(_unknown_version())
_SCHEMA_INVALID = body_of(user_created(given_name=None))
# valid for the typed model alone: refused by the schema's format and type
_EMAIL_FORMAT = body_of(user_created(email="no-at-sign"))
_TIME_AS_NUMBER = body_of(user_created(created_at=1767225600))


@pytest.mark.parametrize(
    ("body", "routing_key", "reason"),
    [
        pytest.param(_NOT_JSON, "user.created.v2", "malformed", id="bytes-not-json"),
        pytest.param(_NOT_A_CLOUDEVENT, "user.created.v2", "malformed", id="json-not-cloudevent"),
        pytest.param(_UNKNOWN_TYPE, "user.created.v9", "unknown_type", id="unknown-type"),
        pytest.param(_SCHEMA_INVALID, "user.created.v2", "schema_invalid", id="schema-invalid"),
        pytest.param(_EMAIL_FORMAT, "user.created.v2", "schema_invalid", id="email-format"),
        pytest.param(_TIME_AS_NUMBER, "user.created.v2", "schema_invalid", id="time-as-number"),
    ],
)
async def test_an_unhandleable_delivery_lands_in_the_dlq_unchanged(
    engine: AsyncEngine,
    broker_url: str,
    settings: MessagingSettings,
    body: bytes,
    routing_key: str,
    reason: str,
) -> None:
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    message_id = f"msg-{reason}"
    async with started_bus(bus) as outcomes:
        await publish_raw(broker_url, bus.names, routing_key, body, message_id=message_id)
        [dead] = await read_queue(broker_url, queues_of(bus).dlq)
        await outcomes.wait_until_handled(message_id, "dead_lettered")
        assert await left_in_work_queue(bus) == 0

    assert dead.reason == reason
    assert dead.body == body
    assert dead.message_id == message_id
    assert dead.properties["content_type"] == CONTENT_TYPE
    assert header(dead, headers.CONSUMER) == SERVICE
    assert header(dead, headers.ATTEMPTS) == "0"  # no handler ever ran
    assert header(dead, headers.ROUTING_KEY) == routing_key
    first = datetime.fromisoformat(header(dead, headers.FIRST_FAILURE))
    last = datetime.fromisoformat(header(dead, headers.LAST_FAILURE))
    assert first <= last <= datetime.now(UTC)
    assert handled.calls == []
    assert await things_count(engine) == 0


# -- handler failures -------------------------------------------------------------------------


async def test_a_transient_failure_that_heals_on_the_second_tier_is_processed_once(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    failing_calls = 2 * settings.inprocess_retries  # every in-process attempt of two deliveries
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        if handled.record(event, uow) <= failing_calls:
            raise ConnectionError("database hiccup")
        write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created()
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, event)
        await outcomes.wait_until_handled(event["id"])

    assert outcomes_of(outcomes, event["id"]) == ["retried", "retried", "processed"]
    assert len(handled.calls) == failing_calls + 1
    # the third delivery knew of every earlier attempt (x-tributary-attempts travelled along)
    assert handled.calls[-1].context.attempt == failing_calls + 1
    assert await thing_ids(engine) == [event["id"]]


async def test_a_retried_delivery_logs_the_exception_class_and_the_correlation_id(
    engine: AsyncEngine,
    broker_url: str,
    settings: MessagingSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # what the runbook's TributaryConsumerErrorRate section reads: the WARNING line of a retry
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        if handled.record(event, uow) <= settings.inprocess_retries:
            raise ConnectionError("database hiccup at alice@example.com")
        write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created()
    caplog.set_level(logging.WARNING, logger="tributary.messaging.consumer")
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, event)
        await outcomes.wait_until_handled(event["id"])

    assert outcomes_of(outcomes, event["id"]) == ["retried", "processed"]
    [line] = [r for r in caplog.records if getattr(r, "outcome", None) == "retried"]
    assert line.getMessage() == f"retried {event['type']} on {SERVICE} (ConnectionError)"
    assert line.__dict__["reason"] == "ConnectionError"
    assert line.__dict__["correlation_id"] == event["correlationid"]
    assert "alice" not in line.getMessage()


async def test_the_delivery_after_the_second_tier_carries_two_retries(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    # Handlers cannot see AMQP headers: the third delivery fails for good, and its DLQ copy
    # shows the headers it arrived with.
    failing_calls = 2 * settings.inprocess_retries
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        if handled.record(event, uow) <= failing_calls:
            raise ConnectionError("database hiccup")
        raise PermanentError("the third delivery shows its headers in the DLQ")

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created()
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, event)
        [dead] = await read_queue(broker_url, queues_of(bus).dlq)
        await outcomes.wait_until_handled(event["id"], "dead_lettered")

    assert outcomes_of(outcomes, event["id"]) == ["retried", "retried", "dead_lettered"]
    assert header(dead, headers.RETRIES) == "2"
    assert header(dead, headers.ATTEMPTS) == str(failing_calls + 1)
    assert dead.reason == "handler_error"
    assert header(dead, headers.ROUTING_KEY) == "user.created.v2"
    assert dead.body == body_of(event)
    assert await things_count(engine) == 0


async def test_a_permanent_error_is_dead_lettered_at_once(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)
        raise PermanentError("users from this domain are not accepted")

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created()
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, event)
        [dead] = await read_queue(broker_url, queues_of(bus).dlq)
        await outcomes.wait_until_handled(event["id"], "dead_lettered")
        assert await left_in_work_queue(bus) == 0

    assert dead.reason == "handler_error"
    assert "PermanentError: users from this domain are not accepted" in header(dead, headers.ERROR)
    assert headers.RETRIES not in dead.headers  # no retry tier was used
    assert header(dead, headers.ATTEMPTS) == "1"
    assert outcomes_of(outcomes, event["id"]) == ["dead_lettered"]
    assert len(handled.calls) == 1
    assert dead.body == body_of(event)
    assert await things_count(engine) == 0  # the handler's write was rolled back


async def test_a_failure_that_never_heals_is_dead_lettered_with_its_error_masked(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        raise RuntimeError(f"mailbox of {event.data.email} is unreachable")

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created(email="ada@example.com")
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, event)
        [dead] = await read_queue(broker_url, queues_of(bus).dlq)
        await outcomes.wait_until_handled(event["id"], "dead_lettered")

    every_attempt = settings.inprocess_retries * (len(settings.retry_tiers) + 1)
    assert dead.reason == "retries_exhausted"
    assert header(dead, headers.ERROR) == (
        "RuntimeError: mailbox of a***@example.com is unreachable"
    )
    assert "ada@example.com" not in json.dumps(dead.headers, default=headers.text)
    assert header(dead, headers.RETRIES) == str(len(settings.retry_tiers))
    assert header(dead, headers.ATTEMPTS) == str(every_attempt)
    assert outcomes_of(outcomes, event["id"]) == ["retried", "retried", "dead_lettered"]
    assert len(handled.calls) == every_attempt
    assert dead.body == body_of(event)
    assert await things_count(engine) == 0


# -- group commit -----------------------------------------------------------------------------


async def consume_prefetched(
    bus: Callable[[], Bus], events: list[dict[str, Any]], *, dead_letters: int = 0
) -> tuple[OutcomeRecorder, list[DlqMessage]]:
    """Publish ``events`` while no consumer runs, then consume until every one is settled."""
    declaring = bus()
    url = declaring.settings.rabbitmq_url
    async with started_bus(declaring, consume=False):
        await publish_events(url, declaring.names, events)
        consuming = bus()
        async with started_bus(consuming, owns_topology=False) as outcomes:
            await wait_for_settled(outcomes, len(events))
            dlq = queues_of(consuming).dlq
            dead = await read_queue(url, dlq, expect=dead_letters)
            assert await queue_depth(url, dlq) == 0  # and not one more
            assert await left_in_work_queue(consuming) == 0
    return outcomes, dead


async def test_a_poisoned_batch_is_replayed_one_by_one(
    engine: AsyncEngine, settings: MessagingSettings
) -> None:
    events = [user_created() for _ in range(50)]
    poison = events[17]["id"]
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)
        if event.id == poison:
            raise PermanentError("this user may not sign up")

    def bus() -> Bus:
        return Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)

    outcomes, [dead] = await consume_prefetched(bus, events, dead_letters=1)

    assert outcomes.count("processed") == 49
    assert outcomes_of(outcomes, poison) == ["dead_lettered"]
    assert dead.message_id == poison
    assert dead.reason == "handler_error"
    assert sorted(await thing_ids(engine)) == sorted(e["id"] for e in events if e["id"] != poison)
    assert len(await inbox(engine)) == 49


async def test_waiting_deliveries_share_a_transaction(
    engine: AsyncEngine, settings: MessagingSettings
) -> None:
    events = [user_created() for _ in range(50)]
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    def bus() -> Bus:
        return Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)

    outcomes, _ = await consume_prefetched(bus, events)

    assert outcomes.count("processed") == len(events)
    per_transaction = handled.per_transaction()
    assert sum(per_transaction) == len(events)  # each handled once: no batch was replayed
    assert len(per_transaction) < len(events)
    assert max(per_transaction) > 1
    assert await things_count(engine) == len(events)


async def test_an_irreversible_handler_runs_one_delivery_per_transaction(
    engine: AsyncEngine, settings: MessagingSettings
) -> None:
    # the catalog says user.created is irreversible for the email service (it sends mail)
    events = [user_created() for _ in range(20)]
    handled = Handled()

    async def send_welcome(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    def bus() -> Bus:
        return Bus("email", engine, handlers={UserCreatedV2: send_welcome}, settings=settings)

    outcomes, _ = await consume_prefetched(bus, events)

    assert outcomes.count("processed") == len(events)
    assert handled.per_transaction() == [1] * len(events)
    assert await things_count(engine) == len(events)


async def test_batch_max_of_one_turns_group_commit_off(
    engine: AsyncEngine, broker_url: str
) -> None:
    settings = isolated_settings(broker_url, batch_max=1)
    events = [user_created() for _ in range(20)]
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    def bus() -> Bus:
        return Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)

    outcomes, _ = await consume_prefetched(bus, events)

    assert outcomes.count("processed") == len(events)
    assert handled.per_transaction() == [1] * len(events)
    assert await things_count(engine) == len(events)


# -- what the handler sees --------------------------------------------------------------------


async def test_a_v1_user_created_reaches_a_v2_handler_upcast(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created(version=1, name="Ada King Lovelace")
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, event)
        await outcomes.wait_until_handled(event["id"])

    [call] = handled.calls
    assert isinstance(call.event.data, UserCreatedV2)
    assert (call.event.data.given_name, call.event.data.family_name) == ("Ada", "King Lovelace")
    assert call.event.data.email == "ada@example.com"
    assert await thing_ids(engine) == [event["id"]]


async def test_an_event_written_by_a_handler_is_caused_by_the_event_it_handles(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        uow.outbox.add(
            WorkspaceCreatedV1(
                workspace_id="ws_0123456789",
                owner_id=event.data.user_id,
                name="Ada's workspace",
                created_at=datetime.now(UTC),
            )
        )

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    event = user_created(correlationid="corr-signup-ada")
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, event)
        await outcomes.wait_until_handled(event["id"])

    async with AsyncSession(engine) as session:
        [row] = (await session.exec(select(OutboxRow))).all()
    produced = json.loads(row.body)
    assert produced["type"] == "com.tributary.workspace.created.v1"
    assert produced["correlationid"] == "corr-signup-ada"
    assert produced["causationid"] == event["id"]
    assert row.correlation_id == "corr-signup-ada"


async def test_a_replayed_delivery_is_marked_as_replay_for_the_handler(
    engine: AsyncEngine, broker_url: str, settings: MessagingSettings
) -> None:
    handled = Handled()

    async def on_user_created(event: UserCreated, uow: UnitOfWork) -> None:
        handled.record(event, uow)
        write_thing(event, uow)

    bus = Bus(SERVICE, engine, handlers={UserCreatedV2: on_user_created}, settings=settings)
    live, replayed = user_created(), user_created()
    async with started_bus(bus) as outcomes:
        await publish(broker_url, bus, live)
        await publish(broker_url, bus, replayed, headers={headers.REPLAY: "1"})
        await outcomes.wait_until_handled(live["id"])
        await outcomes.wait_until_handled(replayed["id"])

    assert [c.is_replay for c in handled.of(live["id"])] == [False]
    assert [c.is_replay for c in handled.of(replayed["id"])] == [True]
    assert [r.replay for r in outcomes.of(replayed["id"])] == [True]
    assert sorted(await thing_ids(engine)) == sorted([live["id"], replayed["id"]])
