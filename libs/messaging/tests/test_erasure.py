"""Erasure from the runtime's stores: outbox purge (SQLite, PostgreSQL), DLQ sweep (real broker)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from tributary.contracts.events import EmailSentV1, Payload, UserCreatedV2, UserErasedV1
from tributary.messaging import headers as h
from tributary.messaging.bus import Bus
from tributary.messaging.db import OutboxRow, session_factory, utcnow
from tributary.messaging.erasure import (
    DeadLetterQueueMissing,
    ErasedUser,
    PersonMatcher,
    SweepCounts,
    remember_erased,
    sweep_queue,
    was_erased,
)
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.publisher import Publisher
from tributary.messaging.testing import OutcomeRecorder, delete_prefixed, isolated_settings
from tributary.messaging.uow import UnitOfWork

from .helpers import publish_events, queues_of, user_created

PERSON = "usr_erase0123456789"
OTHER = "usr_keep00123456789"
ADDRESS = "zelda.q@example.com"


def created(user_id: str, email: str, given_name: str = "Zelda") -> UserCreatedV2:
    return UserCreatedV2(
        user_id=user_id,
        email=email,
        given_name=given_name,
        family_name="Quill",
        plan="free",
        locale="en-GB",
        created_at=datetime.now(UTC),
    )


def sent(to: str, user_id: str | None = None) -> EmailSentV1:
    return EmailSentV1(
        email_id=f"eml_{uuid.uuid4().hex[:20]}",
        message_id=f"<{uuid.uuid4().hex}@tributary.dev>",
        to=to,
        template="notification",
        user_id=user_id,
        sent_at=datetime.now(UTC),
    )


# -- matching ----------------------------------------------------------------------------------


def test_a_match_stands_on_its_own_in_any_case_and_json_escaped() -> None:
    matcher = PersonMatcher(PERSON, also=[ADDRESS, "Zoë O'Quill-Brontë"])
    assert matcher.in_text(f'{{"user_id":"{PERSON}"}}')
    assert matcher.in_text(f"users/{PERSON}")
    assert matcher.in_text(f"payment for unknown user {PERSON}.")
    assert matcher.in_text("mail to ZELDA.Q@EXAMPLE.COM failed")
    assert matcher.in_bytes(json.dumps({"name": "Zoë O'Quill-Brontë"}).encode())  # \u00eb
    assert matcher.in_bytes(json.dumps({"name": "Zoë O'Quill-Brontë"}, ensure_ascii=False).encode())
    # part of something longer is someone else
    assert not matcher.in_text("bzelda.q@example.com")
    assert not matcher.in_text("zelda.q@example.com.au")
    assert not matcher.in_text(f"{PERSON}0")
    assert not matcher.in_text("z***@example.com")  # masked: not the address


def test_short_strings_are_refused_they_would_match_other_people() -> None:
    with pytest.raises(ValueError, match="at least 6"):
        PersonMatcher(PERSON, also=["Al"])
    with pytest.raises(ValueError, match="at least 6"):
        PersonMatcher("usr_")


def test_header_values_of_every_amqp_type_are_searched() -> None:
    matcher = PersonMatcher(PERSON, also=[ADDRESS])
    assert matcher.in_value({"x-death": [{"queue": "q", "reason": f"x {PERSON}".encode()}]})
    assert matcher.in_value(["a", 1, 2.5, None, True, {"k": ADDRESS}])
    assert not matcher.in_value({"n": 12, "t": datetime.now(UTC), "b": b"\xff\xfe", "f": 1.5})


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(max_size=30),
    after=st.text(max_size=30),
    sep_before=st.sampled_from([" ", '"', "/", ":", "<", "(", "\n", ""]),
    sep_after=st.sampled_from([" ", '"', ">", ")", ",", ". ", "\n", ""]),
)
def test_an_address_between_separators_is_always_found(
    before: str, after: str, sep_before: str, sep_after: str
) -> None:
    matcher = PersonMatcher(PERSON, also=[ADDRESS])
    left = (before + " ") if sep_before == "" else before + sep_before
    right = (" " + after) if sep_after == "" else sep_after + after
    assert matcher.in_text(left + ADDRESS + right)
    assert matcher.in_bytes((left + ADDRESS.upper() + right).encode())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), text=st.text(max_size=200))
def test_arbitrary_input_never_raises_and_never_matches_without_the_strings(
    data: bytes, text: str
) -> None:
    matcher = PersonMatcher(PERSON, also=[ADDRESS])
    for haystack, found in (
        (data.decode("utf-8", errors="replace").lower(), matcher.in_bytes(data)),
        (text.lower(), matcher.in_text(text)),
    ):
        assert not found or ADDRESS in haystack or PERSON in haystack
    matcher.in_value({"a": [data, text, {"b": data}]})


@settings(max_examples=200, deadline=None)
@given(word=st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True))
def test_an_address_inside_a_longer_address_is_not_the_person(word: str) -> None:
    matcher = PersonMatcher(PERSON, also=[ADDRESS])
    assert not matcher.in_text(word + ADDRESS)
    assert not matcher.in_text(ADDRESS + word)
    assert not matcher.in_text(ADDRESS + "." + word)


# -- the outbox --------------------------------------------------------------------------------


async def _stage(engine: AsyncEngine, payloads: list[Payload]) -> list[str]:
    async with UnitOfWork(session_factory(engine)(), "/services/test") as uow:
        ids = [uow.outbox.add(p).id for p in payloads]
        await uow.commit()
    return ids


async def _remaining(engine: AsyncEngine) -> set[str]:
    async with session_factory(engine)() as session:
        return set((await session.exec(select(OutboxRow.event_id))).all())


async def test_the_outbox_purge_deletes_the_persons_rows_and_keeps_the_rest(
    engine: AsyncEngine,
) -> None:
    person_created, person_mail, person_mail_upper, erased = await _stage(
        engine,
        [
            created(PERSON, ADDRESS),
            sent(ADDRESS),  # no user id: found by the address
            sent("Zelda.Q@Example.com"),
            UserErasedV1(user_id=PERSON, erased_at=datetime.now(UTC)),
        ],
    )
    others = await _stage(
        engine,
        [
            created(OTHER, "bzelda.q@example.com", given_name="Zelda"),  # same name, other person
            sent("zelda.q@example.com.au", OTHER),
            created("usr_erase01234567890", "x.y@example.org"),  # the person's id is a prefix
        ],
    )
    async with session_factory(engine)() as session, session.begin():  # published, and parked
        await session.exec(
            update(OutboxRow)
            .where(col(OutboxRow.event_id) == person_created)
            .values(published_at=utcnow())
        )
        await session.exec(
            update(OutboxRow)
            .where(col(OutboxRow.event_id) == person_mail)
            .values(parked_at=utcnow())
        )

    async with UnitOfWork(session_factory(engine)(), "/services/test") as uow:
        # one row per statement: the chunking is exercised
        deleted = await uow.purge_person_from_outbox(PERSON, also=["Zelda.Q@example.COM"], chunk=1)
        await uow.commit()

    assert deleted == 3
    assert await _remaining(engine) == {erased, *others}
    assert person_mail_upper not in await _remaining(engine)


async def test_erase_person_sweeps_first_then_purges_in_the_transaction(
    engine: AsyncEngine,
) -> None:
    await _stage(engine, [created(PERSON, ADDRESS), created(OTHER, "o.ther@example.com")])
    seen: list[PersonMatcher] = []

    async def sweeper(matcher: PersonMatcher) -> SweepCounts:
        seen.append(matcher)
        return SweepCounts(scanned=3, removed=1, kept=2)

    async with UnitOfWork(session_factory(engine)(), "/s", sweeper=sweeper) as uow:
        erased = await uow.erase_person(PERSON, also=[ADDRESS])
        await uow.rollback()  # nothing committed: the purge was in the transaction
    assert erased.outbox == 1
    assert erased.dead_letters.removed == 1
    assert seen[0].texts == (PERSON, ADDRESS)
    assert len(await _remaining(engine)) == 2

    async with UnitOfWork(session_factory(engine)(), "/s") as uow:
        with pytest.raises(RuntimeError, match="sweeper"):
            await uow.erase_person(PERSON)


# -- the DLQ sweep, against the real broker ------------------------------------------------------


@pytest.fixture
async def dlq(broker_url: str) -> AsyncIterator[tuple[AbstractConnection, str]]:
    """A fresh quorum queue shaped like a service's DLQ, on the system broker."""
    name = f"t{uuid.uuid4().hex[:10]}.svc.dlq"
    connection = await aio_pika.connect(broker_url)
    channel = await connection.channel()
    await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        yield connection, name
    finally:
        if not connection.is_closed:
            await connection.close()
        cleanup = await aio_pika.connect(broker_url)
        async with cleanup:
            await (await cleanup.channel()).queue_delete(name)


def _failure_headers(error: str) -> dict[str, Any]:
    return {
        h.REASON: "handler_error",
        h.ERROR: error,
        h.CONSUMER: "svc",
        h.ATTEMPTS: 3,
        h.FIRST_FAILURE: "2026-01-01T00:00:00.000Z",
        h.ROUTING_KEY: "user.created.v2",
        "x-death": [
            {
                "count": 1,
                "reason": "delivery_limit",
                "queue": "t.svc.events",
                "exchange": "",
                "routing-keys": ["t.svc.events"],
            }
        ],
        "x-nested": {"deep": [1, "two", {"three": bytearray(b"bytes")}]},
    }


async def _fill(connection: AbstractConnection, queue: str) -> dict[str, dict[str, Any]]:
    """Messages about the person and about others; returns the others by message id."""
    channel = await connection.channel(publisher_confirms=True)
    others: dict[str, dict[str, Any]] = {}

    async def put(body: bytes, mid: str, headers: dict[str, Any], *, keep: bool) -> None:
        message = aio_pika.Message(
            body,
            message_id=mid,
            headers=headers,
            type="com.tributary.user.created.v2",
            correlation_id=f"corr-{mid}",
            app_id="svc",
            content_type="application/cloudevents+json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await channel.default_exchange.publish(message, queue)
        if keep:
            others[mid] = headers

    for n in range(7):
        other = json.dumps(user_created(user_id=f"usr_other{n:010d}", email=f"o{n}@example.com"))
        await put(other.encode(), f"other-{n}", _failure_headers(f"boom {n}"), keep=True)
        mine = json.dumps(user_created(user_id=PERSON, email=ADDRESS))
        await put(mine.encode(), f"mine-{n}", _failure_headers("boom"), keep=False)
    # about the person only in a header; not JSON at all; and the erasure itself (kept)
    await put(b"garbage", "mine-header", _failure_headers(f"unknown user {PERSON}"), keep=False)
    await put(b"\xff\xfe not utf-8", "other-binary", _failure_headers("x"), keep=True)
    erasure = json.dumps({"type": "com.tributary.user.erased.v1", "data": {"user_id": PERSON}})
    erasure_headers = {**_failure_headers("boom"), h.ROUTING_KEY: "user.erased.v1"}
    await put(erasure.encode(), "erasure", erasure_headers, keep=True)
    await channel.close()
    return others


async def _drain(connection: AbstractConnection, queue: str) -> list[aio_pika.IncomingMessage]:
    channel = await connection.channel()
    source = await channel.declare_queue(queue, passive=True)
    found: list[Any] = []
    while (message := await source.get(no_ack=False, fail=False, timeout=5)) is not None:
        found.append(message)
    await channel.close()  # requeues them: reading changes nothing
    return found


async def test_the_sweep_removes_the_persons_messages_and_puts_back_the_rest_intact(
    dlq: tuple[AbstractConnection, str],
) -> None:
    connection, queue = dlq
    others = await _fill(connection, queue)
    publisher = Publisher(connection)
    await publisher.open()
    matcher = PersonMatcher(PERSON, also=[ADDRESS])

    counts = await sweep_queue(connection, publisher, queue, matcher, batch=4)

    assert (counts.scanned, counts.removed, counts.kept) == (17, 8, 9)
    left = await _drain(connection, queue)
    assert sorted(m.message_id or "" for m in left) == sorted(others)
    for message in left:
        headers: dict[str, Any] = dict(message.headers or {})
        headers.pop("x-delivery-count", None)
        assert headers == others[message.message_id or ""]  # every header, x-death included
        assert message.type == "com.tributary.user.created.v2"
        assert message.correlation_id == f"corr-{message.message_id}"
        assert message.app_id == "svc"
    # a second sweep finds nothing more and keeps everything
    again = await sweep_queue(connection, publisher, queue, matcher)
    assert (again.scanned, again.removed, again.kept) == (9, 0, 9)
    await publisher.close()


async def test_a_broker_failure_mid_sweep_loses_nothing_and_a_second_sweep_finishes(
    dlq: tuple[AbstractConnection, str], broker_url: str
) -> None:
    connection, queue = dlq
    others = await _fill(connection, queue)
    publishing = await aio_pika.connect(broker_url)
    publisher = Publisher(publishing)
    await publisher.open()
    matcher = PersonMatcher(PERSON, also=[ADDRESS])

    class Failing(Publisher):
        """Loses the reading connection while the third copy is being put back."""

        calls = 0

        async def publish(self, exchange: str, routing_key: str, message: Any) -> None:
            Failing.calls += 1
            if Failing.calls == 3:
                await connection.close()
            await publisher.publish(exchange, routing_key, message)

    failing = Failing(publishing)
    with pytest.raises(InfrastructureError):
        await sweep_queue(connection, failing, queue, matcher, batch=4)

    reader = await aio_pika.connect(broker_url)
    async with reader:
        left = await _drain(reader, queue)
        ids = [m.message_id for m in left]
        assert set(others) <= set(ids)  # every message not about the person is still there
        counts = await sweep_queue(reader, publisher, queue, matcher)
        assert counts.removed >= 1
        final = await _drain(reader, queue)
    assert {m.message_id for m in final} == set(others)  # copies of a kept message may repeat
    await publisher.close()
    await publishing.close()


async def test_a_bug_during_a_sweep_is_raised_as_it_is_and_leaves_every_message(
    dlq: tuple[AbstractConnection, str],
) -> None:
    connection, queue = dlq
    others = await _fill(connection, queue)
    publisher = Publisher(connection)
    await publisher.open()

    class Broken(PersonMatcher):
        def in_message(self, message: Any) -> bool:
            raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # not an outage: the retry tiers, then the DLQ
        await sweep_queue(connection, publisher, queue, Broken(PERSON))
    left = await _drain(connection, queue)
    assert len(left) == 17
    assert set(others) <= {m.message_id for m in left}
    await publisher.close()


async def test_sweeping_a_queue_that_does_not_exist_says_so(
    dlq: tuple[AbstractConnection, str],
) -> None:
    connection, queue = dlq
    publisher = Publisher(connection)
    await publisher.open()
    with pytest.raises(DeadLetterQueueMissing):
        await sweep_queue(connection, publisher, queue + ".missing", PersonMatcher(PERSON))
    await publisher.close()


# -- through a running bus: the handler's sweep is retried, never skipped -----------------------


class FlakyBus(Bus):
    """The first sweep fails as a broker outage would."""

    failures = 1

    async def sweep_dead_letters(self, matcher: PersonMatcher) -> SweepCounts:
        if self.failures:
            self.failures -= 1
            raise InfrastructureError("broker", "sweep failed (test)")
        return await super().sweep_dead_letters(matcher)


async def test_a_handler_erasing_a_person_sweeps_the_dlq_and_a_failed_sweep_is_retried(
    engine: AsyncEngine, broker_url: str
) -> None:
    results: list[int] = []

    async def on_user_created(event: Any, uow: UnitOfWork) -> None:
        raise ValueError("this consumer dead-letters every sign-up")

    async def on_user_erased(event: Any, uow: UnitOfWork) -> None:
        erased = await uow.erase_person(event.data.user_id, also=[ADDRESS])
        results.append(erased.dead_letters.removed)

    bus = FlakyBus(
        "eraser",
        engine,
        handlers={UserCreatedV2: on_user_created, UserErasedV1: on_user_erased},
        settings=isolated_settings(broker_url, retry_tiers=(0.1,), inprocess_retries=1),
    )
    recorder = OutcomeRecorder()
    bus.listeners.append(recorder)
    await bus.start()
    try:
        mine = user_created(user_id=PERSON, email=ADDRESS)
        other = user_created(user_id=OTHER, email="o.ther@example.com")
        await publish_events(broker_url, bus.names, [mine, other])
        await recorder.wait(lambda: recorder.count("dead_lettered") == 2, what="two DLQ'd")
        erasure = {
            **user_created(),
            "type": "com.tributary.user.erased.v1",
            "data": {"user_id": PERSON, "erased_at": "2026-01-09T11:00:00Z"},
        }
        await publish_events(broker_url, bus.names, [erasure])
        await recorder.wait_until_handled(erasure["id"], timeout=30)
        assert bus.failures == 0  # the first attempt failed, the delivery was handled again
        assert results == [1]
        connection = await aio_pika.connect(broker_url)
        async with connection:
            left = await _drain(connection, queues_of(bus).dlq)
        assert [m.message_id for m in left] == [other["id"]]
    finally:
        await bus.stop()
        qs = queues_of(bus)
        await delete_prefixed(broker_url, bus.names, [qs.work, qs.dlq, *qs.retries])


async def test_an_erased_user_is_remembered_once_by_id_only(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        table = ErasedUser.metadata.tables[ErasedUser.__tablename__]
        await conn.run_sync(lambda c: ErasedUser.metadata.create_all(c, tables=[table]))
    for _ in range(2):  # a redelivered erasure
        async with session_factory(engine)() as session, session.begin():
            await remember_erased(session, PERSON)
    async with session_factory(engine)() as session:
        assert await was_erased(session, PERSON)
        assert not await was_erased(session, OTHER)
        assert not await was_erased(session, None)
        assert list((await session.exec(select(ErasedUser.user_id))).all()) == [PERSON]
