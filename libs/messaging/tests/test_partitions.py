"""Per-entity ordering: slots in routing keys, partition queues, their bindings and retry tiers,
the sequence check; against the real broker where it routes."""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts import catalog as catalog_module
from tributary.contracts.catalog import Catalog, catalog, load_catalog
from tributary.contracts.envelope import CloudEvent, new_event
from tributary.contracts.events import UserEmailChangedV1
from tributary.messaging import context
from tributary.messaging.bus import Bus
from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.deadletters import safe_routing_key
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.partitions import (
    binding_keys,
    key_of,
    partition_binding_keys,
    slot_of,
    wire_routing_key,
)
from tributary.messaging.sequence import STALE, EarlyEvent, MissingSequence, check_sequence
from tributary.messaging.testing import (
    isolated_settings,
    partitioned_contracts,
    publish_raw,
    queue_depth,
    read_queue,
    started_bus,
)
from tributary.messaging.topology import Names, queue_arguments
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.waiting import eventually

SLOTS = 12
PARTITIONS = 3
TYPE = "user.email_changed"


@pytest.fixture(scope="module")
def test_catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """The contracts with ``ordering`` (3 partitions) and ``plainview`` consuming TYPE."""
    root = partitioned_contracts(
        tmp_path_factory.mktemp("contracts"),
        consumers={TYPE: ["ordering", "plainview"]},
        partitions={"ordering": PARTITIONS},
        slots=SLOTS,
    )
    return load_catalog(root)


@pytest.fixture
def partitioned(test_catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> Iterator[Catalog]:
    """The process-wide catalog is ``test_catalog`` for one test."""
    monkeypatch.setenv("TRIBUTARY_CONTRACTS_DIR", str(test_catalog.root))
    catalog_module.catalog.cache_clear()
    yield catalog()
    monkeypatch.undo()
    catalog_module.catalog.cache_clear()


# -- slots and bindings (no broker) ---------------------------------------------------------


def test_a_slot_is_the_crc32_of_the_key_modulo_the_slots() -> None:
    # stable across processes, machines and Python versions (no hash seed involved)
    assert slot_of("users/usr_1", 32) == zlib.crc32(b"users/usr_1") % 32 == 7
    assert {slot_of(f"users/usr_{n}", SLOTS) for n in range(200)} == set(range(SLOTS))


def test_the_partition_key_is_the_extension_else_the_subject_else_the_id() -> None:
    assert key_of({"partitionkey": "k", "subject": "s", "id": "i"}) == "k"
    assert key_of({"subject": "s", "id": "i"}) == "s"
    assert key_of({"id": "i"}) == "i"
    assert key_of({"partitionkey": 5, "subject": ""}) == ""
    assert key_of(["not", "an", "object"]) == ""


def test_partition_queues_bind_every_slot_exactly_once(test_catalog: Catalog) -> None:
    spec = test_catalog.type(TYPE)
    assert spec.slots == SLOTS
    bound = [
        key
        for k in range(PARTITIONS)
        for key in partition_binding_keys([spec], slots=SLOTS, partitions=PARTITIONS, partition=k)
    ]
    assert sorted(bound) == sorted(f"{TYPE}.*.s{slot}" for slot in range(SLOTS))
    # an unpartitioned consumer of the type binds its slotted and unslotted keys
    assert binding_keys([spec]) == [f"{TYPE}.*", f"{TYPE}.*.*"]
    assert binding_keys([test_catalog.type("user.created")]) == ["user.created.*"]


def test_a_partitioned_type_is_published_under_its_slot(test_catalog: Catalog) -> None:
    event: CloudEvent[dict[str, Any]] = new_event(
        routing_key=f"{TYPE}.v1", source="/s", data={}, subject="users/usr_1"
    )
    slot = slot_of("users/usr_1", SLOTS)
    assert wire_routing_key(f"{TYPE}.v1", event.to_bytes(), test_catalog) == f"{TYPE}.v1.s{slot}"
    # other types, and keys the catalog does not know, go as they are
    assert wire_routing_key("user.created.v2", event.to_bytes(), test_catalog) == (
        "user.created.v2"
    )
    assert wire_routing_key("nothing.v1", b"{}", test_catalog) == "nothing.v1"


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200) | st.text(max_size=80).map(lambda t: t.encode()))
def test_any_body_gets_a_slot_and_never_an_error(test_catalog: Catalog, body: bytes) -> None:
    key = wire_routing_key(f"{TYPE}.v1", body, test_catalog)
    assert key.rpartition(".s")[0] == f"{TYPE}.v1"
    assert 0 <= int(key.rpartition(".s")[2]) < SLOTS


def test_a_partition_queue_has_a_single_active_consumer_and_its_own_retry_tiers() -> None:
    names = Names("p.")
    qs = names.partition_queues("ordering", 2, 1)
    assert (qs.work, qs.dlq) == ("p.ordering.events.p1", "p.ordering.dlq")
    assert qs.retries == ("p.ordering.events.p1.retry.1", "p.ordering.events.p1.retry.2")
    declared = queue_arguments(names, qs, tier_seconds=(1.0, 10.0), delivery_limit=5)
    assert declared[qs.work]["x-single-active-consumer"] is True
    assert declared[qs.work]["x-queue-type"] == "quorum"
    for retry in qs.retries:
        # a delayed message returns to its own partition, never to a sibling
        assert declared[retry]["x-dead-letter-routing-key"] == qs.work
    plain = names.service_queues("ordering", 2)
    assert (
        "x-single-active-consumer"
        not in queue_arguments(names, plain, tier_seconds=(1.0, 10.0), delivery_limit=5)[plain.work]
    )


# -- the sequence check -----------------------------------------------------------------------


def _sequenced(sequence: int | None) -> CloudEvent[dict[str, Any]]:
    return new_event(routing_key=f"{TYPE}.v1", source="/s", data={}, sequence=sequence)


def test_the_next_applies_a_stale_one_is_skipped_an_early_one_waits() -> None:
    assert check_sequence(_sequenced(1), None) == "next"
    assert check_sequence(_sequenced(5), 4) == "next"
    with context.use(context.MessageContext(consumer="seqtest")):
        before = STALE["seqtest"]
        assert check_sequence(_sequenced(4), 4) == "stale"
        assert check_sequence(_sequenced(1), 4) == "stale"
        assert STALE["seqtest"] == before + 2
    with pytest.raises(EarlyEvent):
        check_sequence(_sequenced(6), 4)
    with pytest.raises(EarlyEvent):
        check_sequence(_sequenced(2), None)
    assert check_sequence(_sequenced(6), 4, gaps=True) == "next"
    assert check_sequence(_sequenced(0), None, first=0) == "next"
    with pytest.raises(MissingSequence):
        check_sequence(_sequenced(None), 4)


@settings(max_examples=300, deadline=None)
@given(sequence=st.integers(0, 10**18 - 1), last=st.none() | st.integers(0, 10**18 - 1))
def test_every_sequence_is_exactly_one_of_next_stale_early(sequence: int, last: int | None) -> None:
    expected = 1 if last is None else last + 1
    try:
        verdict = check_sequence(_sequenced(sequence), last)
    except EarlyEvent:
        assert sequence > expected
        return
    assert verdict == ("next" if sequence == expected else "stale")
    assert sequence <= expected


# -- against the broker ------------------------------------------------------------------------


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[dict[str, AsyncEngine]]:
    made: dict[str, AsyncEngine] = {}
    for name in ("identity", "ordering-a", "ordering-b", "plainview"):
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / name}.db")
        await create_runtime_tables(engine)
        made[name] = engine
    yield made
    for engine in made.values():
        await engine.dispose()


def _change(n: int, user: str) -> UserEmailChangedV1:
    return UserEmailChangedV1(
        user_id=user,
        old_email=f"old{n}@example.com",
        new_email=f"new{n}@example.com",
        changed_at=datetime.now(UTC),
    )


async def test_events_reach_the_partition_of_their_slot_in_order_and_fail_over(
    partitioned: Catalog, engines: dict[str, AsyncEngine], broker_url: str
) -> None:
    settings_ = isolated_settings(broker_url, partition_stagger_seconds=0.0, prefetch=5)
    seen: dict[str, list[tuple[str, int]]] = {"ordering": [], "plainview": []}
    users = [f"usr_part{n:05d}" for n in range(6)]
    failures: list[int] = []

    def recorder(name: str) -> Any:
        async def handle(event: CloudEvent[UserEmailChangedV1], uow: UnitOfWork) -> None:
            sequence = event.sequence or 0
            mine = name == "ordering" and (event.data.user_id, sequence) == (users[0], 7)
            if mine and len(failures) < 2:  # a batch's attempt and the one-by-one attempt
                failures.append(sequence)
                raise RuntimeError("transient")  # through the partition's own retry tier
            seen[name].append((event.data.user_id, sequence))

        return handle

    def bus(engine: str, service: str) -> Bus:
        return Bus(
            service,
            engines[engine],
            handlers={UserEmailChangedV1: recorder(service)},
            settings=settings_.model_copy(update={"inprocess_retries": 1}),
        )

    async with AsyncExitStack() as stack:
        producer = Bus("identity", engines["identity"], settings=settings_)
        await stack.enter_async_context(started_bus(producer))
        a = bus("ordering-a", "ordering")
        a_out = await stack.enter_async_context(started_bus(a, consume=False))
        plain = bus("plainview", "plainview")
        plain_out = await stack.enter_async_context(started_bus(plain))
        # 60 events, interleaved over 6 users, each user's numbered 1..10
        async with producer.unit_of_work() as uow:
            for n in range(10):
                for user in users:
                    uow.outbox.add(_change(n, user), subject=f"users/{user}", sequence=n + 1)
            await uow.commit()
        await plain_out.wait_for_count("processed", 60)
        # nothing consumed the partitions yet: each holds the events of its slots
        expected = [0] * PARTITIONS
        for user in users:
            expected[slot_of(f"users/{user}", SLOTS) % PARTITIONS] += 10
        queues = [producer.names.partition_queues("ordering", 2, k).work for k in range(3)]
        assert [await queue_depth(broker_url, q) for q in queues] == expected
        # replica a consumes (a second replica waits on every partition)
        await a.stop()
        a = bus("ordering-a", "ordering")
        a_out = await stack.enter_async_context(started_bus(a, owns_topology=False))
        b = bus("ordering-b", "ordering")
        b_out = await stack.enter_async_context(started_bus(b, owns_topology=False))
        await a_out.wait_for_count("processed", 60)
        assert b_out.count("processed") == 0  # single active consumer: a has them all
        assert a_out.count("retried") >= 1
        for user in users:
            mine = [s for u, s in seen["ordering"] if u == user]
            # in order, except the one event that went through the retry tier
            without_retry = [s for s in mine if s != 7]
            assert without_retry == sorted(without_retry)
            assert sorted(mine) == list(range(1, 11))
        # replica a stops: b becomes active on every partition and takes new events
        await a.stop()
        async with producer.unit_of_work() as uow:
            uow.outbox.add(_change(99, users[0]), subject=f"users/{users[0]}", sequence=11)
            await uow.commit()
        await b_out.wait_for_count("processed", 1)
        # foreign input on a partition: a malformed sequence is dead-lettered as malformed
        slot = slot_of("users/usr_raw00001", SLOTS)
        body = new_event(
            routing_key=f"{TYPE}.v1",
            source="/external",
            data=_change(0, "usr_raw00001").model_dump(mode="json"),
        ).to_dict()
        body["sequence"] = "not-a-number"
        await publish_raw(
            broker_url, producer.names, f"{TYPE}.v1.s{slot}", json.dumps(body).encode()
        )
        dead = await read_queue(broker_url, b.names.service_queues("ordering", 0).dlq)
        assert dead[0].reason == "malformed"
        assert "sequence" in str(dead[0].headers.get("x-tributary-error"))
        await plain_out.wait_for_count("dead_lettered", 1)


async def test_an_outage_pauses_a_partition_consumer_without_handing_its_queue_over(
    partitioned: Catalog,
    engines: dict[str, AsyncEngine],
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings_ = isolated_settings(
        broker_url, partition_stagger_seconds=0.0, pause_probe_max_seconds=0.2
    )
    user = "usr_pause00001"
    handled: dict[str, list[int]] = {"a": [], "b": []}
    down = [True]

    def recorder(name: str) -> Any:
        async def handle(event: CloudEvent[UserEmailChangedV1], uow: UnitOfWork) -> None:
            if name == "a" and event.sequence == 3 and down[0]:
                raise InfrastructureError("database", "an outage for the test")
            handled[name].append(event.sequence or 0)

        return handle

    async def still_down() -> None:
        if down[0]:
            raise RuntimeError("the database is still down")

    async def publish(sequences: range) -> None:
        async with producer.unit_of_work() as uow:
            for n in sequences:
                uow.outbox.add(_change(n, user), subject=f"users/{user}", sequence=n)
            await uow.commit()

    async with AsyncExitStack() as stack:
        producer = Bus("identity", engines["identity"], settings=settings_)
        await stack.enter_async_context(started_bus(producer))
        a = Bus(
            "ordering",
            engines["ordering-a"],
            handlers={UserEmailChangedV1: recorder("a")},
            settings=settings_,
        )
        a_out = await stack.enter_async_context(started_bus(a))
        for consumer in a.consumers:
            monkeypatch.setattr(consumer, "_probe_database", still_down)
        b = Bus(
            "ordering",
            engines["ordering-b"],
            handlers={UserEmailChangedV1: recorder("b")},
            settings=settings_,
        )
        b_out = await stack.enter_async_context(started_bus(b, owns_topology=False))
        await publish(range(1, 6))

        async def paused() -> bool:
            return any(c.paused for c in a.consumers)

        await eventually(paused, what="a paused by the outage")
        # while a is paused, more events of the same user arrive
        await publish(range(6, 11))
        partition = slot_of(f"users/{user}", SLOTS) % PARTITIONS
        queue = a.names.partition_queues("ordering", 2, partition).work

        async def all_delivered() -> bool:
            rows = await producer.relay.pending() if producer.relay else (0, None)
            return rows[0] == 0 and await queue_depth(broker_url, queue) == 0

        await eventually(all_delivered, what="every event delivered to a consumer")
        down[0] = False
        await a_out.wait_for_count("processed", 10)
        # a kept its subscription while paused: b, the standby, never got one of them
        assert b_out.count("processed") == 0
        assert handled["b"] == []
        # what a rolled back came again; the last application of each is in order
        assert handled["a"][-8:] == list(range(3, 11))
        assert a_out.count("requeued") == 0


def test_a_dead_letter_names_the_type_of_a_slotted_routing_key() -> None:
    assert safe_routing_key(f"{TYPE}.v1.s3") == f"{TYPE}.v1"
    assert safe_routing_key(f"com.tributary.{TYPE}.v1.s1023") == f"{TYPE}.v1"
    assert safe_routing_key(f"{TYPE}.v1") == f"{TYPE}.v1"
    for odd in (f"{TYPE}.v1.s", f"{TYPE}.v1.s12345", f"{TYPE}.s3", f"{TYPE}.v1.x3"):
        assert safe_routing_key(odd) is None, odd


async def test_without_partitions_early_events_are_parked_until_their_turn(
    engines: dict[str, AsyncEngine], broker_url: str
) -> None:
    """Updates 1..4 of one user published in reverse: the handler's sequence check applies
    each exactly once, in order; the early ones went through the retry tiers."""
    settings_ = isolated_settings(
        broker_url, retry_tiers=(0.1, 0.2, 0.4, 0.8, 1.6), inprocess_retries=1, batch_max=1
    )
    user = "usr_seq000001"
    applied: list[int] = []
    last: dict[str, int] = {}

    async def handle(event: CloudEvent[UserEmailChangedV1], uow: UnitOfWork) -> None:
        if check_sequence(event, last.get(user, 0)) == "stale":
            return
        last[user] = event.sequence or 0
        applied.append(last[user])

    async with AsyncExitStack() as stack:
        producer = Bus("identity", engines["identity"], settings=settings_)
        await stack.enter_async_context(started_bus(producer))
        consumer = Bus(
            "ordering",
            engines["ordering-a"],
            handlers={UserEmailChangedV1: handle},
            settings=settings_,
        )
        outcomes = await stack.enter_async_context(started_bus(consumer))
        for n in (4, 3, 2, 1):  # one transaction each: published in this order
            async with producer.unit_of_work() as uow:
                uow.outbox.add(_change(n, user), subject=f"users/{user}", sequence=n)
                await uow.commit()
        await outcomes.wait_for_count("processed", 4, timeout=30)
        assert applied == [1, 2, 3, 4]
        assert outcomes.count("retried") >= 3  # 4, 3 and 2 came early at least once
        assert outcomes.count("dead_lettered") == 0
