"""``eventctl dlq list|replay|archive`` against the real broker.

The DLQ is filled the way production fills it: a running ``Bus`` whose handler fails. The
tests then run the CLI and look at the DLQ, the work queue and what the handler saw.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts.events import UserCreatedV2
from tributary.messaging import PermanentError, headers
from tributary.messaging.bus import Bus
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import (
    OutcomeRecorder,
    announced_dead_letters,
    isolated_settings,
    publish_raw,
    read_queue,
    started_bus,
)
from tributary.messaging.topology import QueueSet

from .helpers import (
    Handler,
    body_of,
    eventctl,
    listed,
    messages_in,
    publish,
    user_created,
    wait_for_depth,
)

pytestmark = pytest.mark.broker

SERVICE = "probe"
NOT_JSON = b"\x00 not a cloudevent"


@dataclass
class Probe:
    """A running service whose handler dead-letters every event until a test fixes it."""

    bus: Bus
    handler: Handler
    outcomes: OutcomeRecorder
    settings: MessagingSettings

    @property
    def queues(self) -> QueueSet:
        return self.bus.names.service_queues(SERVICE, len(self.settings.retry_tiers))

    async def dead_letter(self, *events: dict[str, Any]) -> list[str]:
        for event in events:
            await publish(self.settings, event)
        for event in events:
            await self.outcomes.wait_until_handled(event["id"], "dead_lettered")
        return [str(e["id"]) for e in events]

    async def dead_letter_malformed(self, message_id: str) -> str:
        await publish_raw(
            self.settings.rabbitmq_url,
            self.bus.names,
            "user.created.v2",
            NOT_JSON,
            message_id=message_id,
        )
        await self.outcomes.wait_until_handled(message_id, "dead_lettered")
        return message_id

    async def dlq_ids(self, capsys: pytest.CaptureFixture[str]) -> set[str]:
        capsys.readouterr()
        assert await eventctl(self.settings, "dlq", "list", SERVICE, "--json") == 0
        return {row["message_id"] for row in listed(capsys)}

    async def left_in_work_queue(self) -> int:
        """Stop consuming (unsettled deliveries go back), then count what waits."""
        await self.bus.stop()
        return await messages_in(self.settings.rabbitmq_url, self.queues.work)


@pytest.fixture
async def probe(consumer_engine: AsyncEngine, settings: MessagingSettings) -> AsyncIterator[Probe]:
    handler = Handler(failure=PermanentError("users from this domain are not accepted"))
    bus = Bus(SERVICE, consumer_engine, handlers={UserCreatedV2: handler}, settings=settings)
    async with started_bus(bus) as outcomes:
        yield Probe(bus, handler, outcomes, settings)


def processed(probe: Probe, event_id: str) -> int:
    return len(probe.outcomes.of(event_id, "processed"))


# -- list -----------------------------------------------------------------------------------


async def test_list_shows_why_each_message_failed_and_leaves_the_dlq_intact(
    probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = await probe.dead_letter(user_created(), user_created())
    malformed = await probe.dead_letter_malformed("msg-not-json")
    capsys.readouterr()

    assert await eventctl(probe.settings, "dlq", "list", SERVICE, "--json") == 0
    out = capsys.readouterr()
    rows = {row["message_id"]: row for row in map(json.loads, out.out.splitlines())}

    assert {i: r["reason"] for i, r in rows.items()} == {
        first: "handler_error",
        second: "handler_error",
        malformed: "malformed",
    }
    row = rows[first]
    assert row["queue"] == probe.queues.dlq
    assert row["type"] == "com.tributary.user.created.v2"
    assert row["consumer"] == SERVICE
    assert row["attempts"] == 1
    assert row["routing_key"] == "user.created.v2"
    assert row["error"] == "PermanentError: users from this domain are not accepted"
    first_failure = datetime.fromisoformat(row["first_failure"])
    assert first_failure <= datetime.fromisoformat(row["last_failure"])
    assert "scanned 3, selected 3, skipped 0 (left in the DLQ)" in out.err

    # nothing was consumed: the same three are there, and a second listing shows them again
    assert await messages_in(probe.settings.rabbitmq_url, probe.queues.dlq) == 3
    assert await eventctl(probe.settings, "dlq", "list", SERVICE) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["MESSAGE", "ID", "TYPE"]
    assert sorted(line.split()[0] for line in table[1:4]) == sorted([first, second, malformed])
    assert table[-1].endswith("scanned 3, selected 3, skipped 0 (left in the DLQ)")
    assert await probe.dlq_ids(capsys) == {first, second, malformed}


async def test_list_with_a_reason_shows_only_those_messages(
    probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    await probe.dead_letter(user_created())
    malformed = await probe.dead_letter_malformed("msg-not-json")
    capsys.readouterr()

    args = ("dlq", "list", f"{SERVICE}.dlq", "--reason", "malformed", "--json")
    assert await eventctl(probe.settings, *args) == 0

    assert [row["message_id"] for row in listed(capsys)] == [malformed]
    assert await messages_in(probe.settings.rabbitmq_url, probe.queues.dlq) == 2


async def test_listing_a_dlq_that_does_not_exist_names_it(
    settings: MessagingSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await eventctl(settings, "dlq", "list", "nobody") == 2

    assert f"queue '{settings.name_prefix}nobody.dlq' does not exist" in capsys.readouterr().err


# -- replay ---------------------------------------------------------------------------------


async def test_replay_after_the_handler_is_fixed_processes_each_message_once_and_empties_the_dlq(
    probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await probe.dead_letter(user_created(), user_created())
    probe.handler.failure = None
    capsys.readouterr()

    assert await eventctl(probe.settings, "dlq", "replay", SERVICE) == 0
    for event_id in ids:
        await probe.outcomes.wait_until_handled(event_id)

    assert capsys.readouterr().out.strip() == (
        f"replay {probe.queues.dlq} -> {probe.queues.work}: scanned 2, selected 2, "
        "republished 2, duplicate 0, failed 0, skipped 0 (left in the DLQ)"
    )
    assert await messages_in(probe.settings.rabbitmq_url, probe.queues.dlq) == 0
    assert await probe.left_in_work_queue() == 0
    for event_id in ids:
        assert processed(probe, event_id) == 1
        _failed, replayed = probe.handler.of(event_id)
        # a fresh start: attempts reset, and not a replay of processed events
        assert (replayed.attempt, replayed.is_replay) == (1, False)


async def test_replay_with_filters_leaves_the_other_messages_in_the_dlq(
    probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = await probe.dead_letter(user_created(), user_created())
    malformed = await probe.dead_letter_malformed("msg-not-json")
    probe.handler.failure = None
    capsys.readouterr()

    assert await eventctl(probe.settings, "dlq", "replay", SERVICE, "--id", first) == 0
    await probe.outcomes.wait_until_handled(first)
    assert "scanned 3, selected 1, republished 1" in capsys.readouterr().out
    assert await probe.dlq_ids(capsys) == {second, malformed}

    args = ("--reason", "handler_error", "--type", "user.created")
    assert await eventctl(probe.settings, "dlq", "replay", SERVICE, *args) == 0
    await probe.outcomes.wait_until_handled(second)
    assert "selected 1, republished 1" in capsys.readouterr().out
    assert await probe.dlq_ids(capsys) == {malformed}

    assert await probe.left_in_work_queue() == 0
    assert (processed(probe, first), processed(probe, second)) == (1, 1)


async def test_two_copies_of_one_message_are_replayed_once(
    probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    event = user_created()
    await publish(probe.settings, event)
    await publish(probe.settings, event)  # a producer's retry: the same id and body
    await probe.outcomes.wait_until_handled(event["id"], "dead_lettered", times=2)
    probe.handler.failure = None
    capsys.readouterr()

    assert await eventctl(probe.settings, "dlq", "replay", SERVICE) == 0
    await probe.outcomes.wait_until_handled(event["id"])

    assert "selected 2, republished 1, duplicate 1, failed 0" in capsys.readouterr().out
    assert await messages_in(probe.settings.rabbitmq_url, probe.queues.dlq) == 0
    assert await probe.left_in_work_queue() == 0
    assert [r.outcome for r in probe.outcomes.of(event["id"])] == [
        "dead_lettered",
        "dead_lettered",
        "processed",
    ]


async def test_replay_with_a_limit_moves_at_most_that_many(
    probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await probe.dead_letter(user_created(), user_created(), user_created())
    probe.handler.failure = None

    assert await eventctl(probe.settings, "dlq", "replay", SERVICE, "--limit", "2") == 0
    for event_id in ids[:2]:  # the DLQ hands them out in the order they arrived
        await probe.outcomes.wait_until_handled(event_id)

    assert await probe.dlq_ids(capsys) == {ids[2]}
    assert processed(probe, ids[2]) == 0


async def test_a_dry_run_changes_nothing(
    probe: Probe, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ids = set(await probe.dead_letter(user_created(), user_created()))
    probe.handler.failure = None
    archive = tmp_path / "archive.jsonl"
    capsys.readouterr()

    assert await eventctl(probe.settings, "dlq", "replay", SERVICE, "--dry-run") == 0
    assert "republished 0 (dry run: would have republished 2)" in capsys.readouterr().out
    args = ("--to", str(archive), "--dry-run")
    assert await eventctl(probe.settings, "dlq", "archive", SERVICE, *args) == 0
    assert "archived 0 (dry run: would have archived 2)" in capsys.readouterr().out

    assert not archive.exists()
    assert await probe.dlq_ids(capsys) == ids
    assert await probe.left_in_work_queue() == 0
    assert probe.outcomes.count("processed") == 0


async def test_a_replayed_message_that_fails_again_returns_with_fresh_failure_headers(
    probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    probe.handler.failure = ConnectionError("database hiccup")
    event = user_created()
    [event_id] = await probe.dead_letter(event)
    [before] = await read_queue(probe.settings.rabbitmq_url, probe.queues.dlq, ack=False)
    assert before.reason == "retries_exhausted"
    assert headers.text(before.headers[headers.RETRIES]) == "2"

    probe.handler.failure = PermanentError("still broken")
    assert await eventctl(probe.settings, "dlq", "replay", SERVICE) == 0
    await probe.outcomes.wait_until_handled(event_id, "dead_lettered", times=2)

    [after] = await read_queue(probe.settings.rabbitmq_url, probe.queues.dlq, ack=False)
    assert after.reason == "handler_error"
    assert headers.RETRIES not in after.headers
    assert headers.text(after.headers[headers.ATTEMPTS]) == "1"
    assert headers.text(after.headers[headers.ROUTING_KEY]) == "user.created.v2"
    assert headers.text(after.headers[headers.FIRST_FAILURE]) > headers.text(
        before.headers[headers.LAST_FAILURE]
    )
    assert after.body == body_of(event)
    assert probe.handler.calls[-1].attempt == 1


async def test_a_message_dead_lettered_again_after_a_replay_is_announced_again(
    probe: Probe, consumer_engine: AsyncEngine
) -> None:
    [event_id] = await probe.dead_letter(user_created())
    [before] = await read_queue(probe.settings.rabbitmq_url, probe.queues.dlq, ack=False)

    assert await eventctl(probe.settings, "dlq", "replay", SERVICE) == 0  # still broken
    await probe.outcomes.wait_until_handled(event_id, "dead_lettered", times=2)

    [after] = await read_queue(probe.settings.rabbitmq_url, probe.queues.dlq, ack=False)
    assert before.reason == after.reason == "handler_error"
    first = headers.text(before.headers[headers.ANNOUNCEMENT])
    assert headers.text(after.headers[headers.ANNOUNCED_BEFORE]) == first
    second = headers.text(after.headers[headers.ANNOUNCEMENT])
    told = await announced_dead_letters(consumer_engine)
    assert [e.id for e in told] == [first, second]
    assert [e.data["message_id"] for e in told] == [event_id, event_id]


async def test_replay_stops_before_moving_anything_when_the_work_queue_is_gone(
    probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = set(await probe.dead_letter(user_created()))
    await probe.bus.stop()
    connection = await aio_pika.connect(probe.settings.rabbitmq_url)
    async with connection:
        await (await connection.channel()).queue_delete(probe.queues.work)

    assert await eventctl(probe.settings, "dlq", "replay", SERVICE) == 2

    assert f"queue '{probe.queues.work}' does not exist" in capsys.readouterr().err
    assert await probe.dlq_ids(capsys) == ids


# -- archive --------------------------------------------------------------------------------


async def test_archive_writes_the_selected_messages_to_a_file_and_removes_only_them(
    probe: Probe, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    first, second = await probe.dead_letter(user_created(), user_created())
    malformed = await probe.dead_letter_malformed("msg-not-json")
    archive = tmp_path / "dlq" / "probe.jsonl"
    capsys.readouterr()

    args = ("--reason", "malformed", "--to", str(archive))
    assert await eventctl(probe.settings, "dlq", "archive", SERVICE, *args) == 0

    assert capsys.readouterr().out.strip() == (
        f"archive {probe.queues.dlq} -> {archive}: scanned 3, selected 1, archived 1, "
        "failed 0, skipped 2 (left in the DLQ)"
    )
    [line] = archive.read_text().splitlines()
    saved = json.loads(line)
    assert base64.b64decode(saved["body_base64"]) == NOT_JSON
    assert saved["message_id"] == malformed
    assert saved["reason"] == "malformed"
    assert saved["properties"]["message_id"] == malformed
    assert saved["headers"][headers.REASON] == "malformed"
    assert saved["headers"][headers.ROUTING_KEY] == "user.created.v2"
    assert await probe.dlq_ids(capsys) == {first, second}

    # a second archive run appends
    assert await eventctl(probe.settings, "dlq", "archive", SERVICE, "--id", first, *args[2:]) == 0
    assert [json.loads(x)["message_id"] for x in archive.read_text().splitlines()] == [
        malformed,
        first,
    ]
    assert await probe.dlq_ids(capsys) == {second}


# -- messages the broker dead-lettered --------------------------------------------------------


async def test_a_message_dead_lettered_at_the_delivery_limit_is_listed_and_replayed(
    consumer_engine: AsyncEngine, broker_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = isolated_settings(broker_url, delivery_limit=1)
    handler = Handler()
    declaring = Bus(SERVICE, consumer_engine, handlers={UserCreatedV2: handler}, settings=settings)
    event = user_created()
    async with started_bus(declaring, consume=False, owns_topology=False):
        queues = declaring.names.service_queues(SERVICE, len(settings.retry_tiers))
        await publish(settings, event)
        await wait_for_depth(broker_url, queues.work, 1)
        await crash_on_it(broker_url, queues.work, times=settings.delivery_limit + 1)
        await wait_for_depth(broker_url, queues.dlq, 1)

    capsys.readouterr()
    assert await eventctl(settings, "dlq", "list", SERVICE, "--json") == 0
    [row] = listed(capsys)
    assert row["message_id"] == event["id"]
    assert row["reason"] == "delivery_limit"
    assert row["consumer"] == queues.work  # the queue the broker dead-lettered it from
    assert row["routing_key"] == "user.created.v2"
    assert row["last_failure"] is not None

    consuming = Bus(SERVICE, consumer_engine, handlers={UserCreatedV2: handler}, settings=settings)
    async with started_bus(consuming) as outcomes:
        assert await eventctl(settings, "dlq", "replay", SERVICE, "--reason", "delivery_limit") == 0
        await outcomes.wait_until_handled(event["id"])
        assert await messages_in(broker_url, queues.dlq) == 0
    assert [c.event_id for c in handler.calls] == [event["id"]]


async def crash_on_it(url: str, queue: str, *, times: int) -> None:
    """Take the first message ``times`` times and hand it back, as a crashing consumer does."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        for _ in range(times):
            message = await q.get(no_ack=False, timeout=10)
            await message.nack(requeue=True)
