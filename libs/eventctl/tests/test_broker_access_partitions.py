"""A catalog with partitioning in eventctl: broker permissions (slotted routing keys and
partition queues pass exactly where the unslotted ones did), and ``eventctl publish`` routing a
partitioned type under its slot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aio_pika
import pytest

from libs.contracts.tests.samples import sample
from tributary.contracts import catalog as catalog_module
from tributary.contracts.catalog import Catalog, load_catalog
from tributary.eventctl.access import service_user
from tributary.eventctl.k8s import work_queues
from tributary.messaging.partitions import slot_of
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import partitioned_contracts
from tributary.messaging.topology import Names

from .helpers import eventctl

TYPE = "user.email_changed"


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root: Path = partitioned_contracts(
        tmp_path_factory.mktemp("contracts"),
        consumers={TYPE: ["ordering", "plainview"]},
        partitions={"ordering": 3},
        slots=12,
    )
    return load_catalog(root)


def _matches(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def test_the_producer_may_publish_slotted_keys_of_its_partitioned_types(cat: Catalog) -> None:
    topic = service_user(cat, "identity", Names(), "").topic
    assert topic is not None
    for key in (f"{TYPE}.v1", f"{TYPE}.v1.s0", f"{TYPE}.v1.s11", "user.created.v2"):
        assert _matches(topic.write, key), key
    for key in (f"{TYPE}.v1.x", f"{TYPE}.v1.s", "user.created.v2.s1", "payment.failed.v1"):
        assert not _matches(topic.write, key), key


def test_a_partitioned_service_declares_and_binds_its_partition_queues(cat: Catalog) -> None:
    user = service_user(cat, "ordering", Names("t."), "")
    for queue in ("t.ordering.events.p0", "t.ordering.events.p2.retry.1", "t.ordering.dlq"):
        assert _matches(user.permissions.configure, queue), queue
        assert _matches(user.permissions.read, queue), queue
    assert not _matches(user.permissions.configure, "t.audit.events.p0")
    assert user.topic is not None
    assert _matches(user.topic.read, f"{TYPE}.*.s3")


def test_unpartitioned_consumers_bind_slotted_keys_and_keep_their_queues(cat: Catalog) -> None:
    user = service_user(cat, "plainview", Names(), "")
    assert user.topic is not None
    for key in (f"{TYPE}.*", f"{TYPE}.*.*"):
        assert _matches(user.topic.read, key), key
    assert not _matches(user.permissions.configure, "plainview.events.p0")
    assert _matches(user.permissions.configure, "plainview.events")


@pytest.mark.broker
async def test_eventctl_publish_routes_a_partitioned_type_under_its_slot(
    cat: Catalog, settings: MessagingSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIBUTARY_CONTRACTS_DIR", str(cat.root))
    catalog_module.catalog.cache_clear()
    names = Names(settings.name_prefix)
    subject = "users/usr_0123456789"
    slot = slot_of(subject, cat.partitioning.slots)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(sample("user.email_changed.v1")))
    connection = await aio_pika.connect(settings.rabbitmq_url)
    try:
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(f"{settings.name_prefix}slot")
            await queue.bind(exchange, f"{TYPE}.*.s{slot}")  # what its partition queue binds
            try:
                code = await eventctl(
                    settings,
                    *("publish", "--type", TYPE, "--data", str(data)),
                    *("--producer", "identity", "--subject", subject),
                )
                assert code == 0
                message = await queue.get(no_ack=True, fail=False, timeout=5)
                assert message is not None
                assert message.routing_key == f"{TYPE}.v1.s{slot}"
            finally:
                await channel.queue_delete(queue.name)
                await channel.exchange_delete(names.exchange)
    finally:
        monkeypatch.undo()
        catalog_module.catalog.cache_clear()


def test_keda_scales_a_partitioned_service_on_its_partition_queues(cat: Catalog) -> None:
    assert work_queues(cat, "ordering", Names()) == [
        "ordering.events.p0",
        "ordering.events.p1",
        "ordering.events.p2",
    ]
    assert work_queues(cat, "plainview", Names()) == ["plainview.events"]
