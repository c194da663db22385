"""``eventctl outbox parked`` and ``eventctl outbox resend`` on a producer's database (SQLite and
PostgreSQL), with the producer's relay parking a row the broker keeps returning.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.messaging.tests.relay_support import (
    Capture,
    commit_events,
    insert_rows,
    new_user,
    outbox_rows,
    raw_row,
    relay_with,
    row_of,
    supervised,
)
from tributary.eventctl.cli import main_async
from tributary.messaging.db import OutboxRow, create_engine, utcnow
from tributary.messaging.publisher import Publisher
from tributary.messaging.relay import RelayPolicy
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import delete_prefixed
from tributary.messaging.topology import Names
from tributary.testkit.waiting import eventually

from .helpers import eventctl

pytestmark = pytest.mark.broker

PARKING = RelayPolicy(max_attempts=3, row_retry_seconds=0.02, step_backoff_seconds=0.02)


@pytest.fixture
async def engine(producer_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(producer_database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def names(settings: MessagingSettings) -> AsyncIterator[Names]:
    names = Names(settings.name_prefix)
    yield names
    await delete_prefixed(settings.rabbitmq_url, names, [])


def parked_row(routing_key: str = "workspace.created.v1") -> OutboxRow:
    row = raw_row(routing_key)
    row.attempts, row.parked_at, row.last_error = 10, utcnow(), "Unroutable: no queue bound"
    return row


async def listed(url: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert await main_async(["outbox", "parked", "--database", url, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


async def test_a_row_the_relay_parked_is_listed_and_resent_once_a_queue_is_bound(
    engine: AsyncEngine,
    producer_database_url: str,
    settings: MessagingSettings,
    names: Names,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = settings.rabbitmq_url
    connection = await aio_pika.connect(url)
    publisher = Publisher(connection)
    await publisher.open()
    relay = relay_with(engine, publisher, settings, PARKING)
    orphan = raw_row("workspace.created.v1")  # nothing consumes workspaces yet
    try:
        async with Capture(url, names, ["user.created.*"]) as users:
            await insert_rows(engine, [orphan])
            ids = await commit_events(engine, [new_user() for _ in range(2)])
            async with supervised(relay):

                async def parked() -> bool:
                    return (await row_of(engine, orphan.event_id)).parked_at is not None

                await eventually(parked, what="the relay to park the row")
                assert [m.message_id for m in await users.take(2)] == ids

                [entry] = await listed(producer_database_url, capsys)
                assert entry["event_id"] == orphan.event_id
                assert entry["type"] == "workspace.created.v1"
                assert entry["attempts"] == 3
                assert "no queue bound" in entry["last_error"]

                # still nobody to take it: it stays parked, with one more attempt on record
                code = await eventctl(
                    settings,
                    "outbox",
                    "resend",
                    "--database",
                    producer_database_url,
                    orphan.event_id,
                )
                assert code == 1
                again = await row_of(engine, orphan.event_id)
                assert (again.parked_at is not None, again.attempts) == (True, 4)

                async with Capture(url, names, ["workspace.created.*"]) as workspaces:
                    code = await eventctl(
                        settings,
                        "outbox",
                        "resend",
                        "--database",
                        producer_database_url,
                        orphan.event_id,
                    )
                    [message] = await workspaces.take(1)
                    assert code == 0
                    assert await listed(producer_database_url, capsys) == []
                    received = await workspaces.flush()
    finally:
        await connection.close()
    row = await row_of(engine, orphan.event_id)

    assert message.message_id == orphan.event_id
    assert message.type == "com.tributary.workspace.created.v1"
    assert message.app_id == "signup"  # the producing service, from the event's source
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.body == orphan.body
    assert [m.message_id for m in received] == [orphan.event_id]  # once: the relay left it
    assert row.published_at is not None
    assert row.parked_at is None


async def test_resend_all_publishes_every_parked_row_and_reports_unknown_ids(
    engine: AsyncEngine,
    producer_database_url: str,
    settings: MessagingSettings,
    names: Names,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [parked_row(), parked_row()]
    waiting = raw_row("workspace.created.v1")  # not parked: resend leaves it to the relay
    await insert_rows(engine, [*rows, waiting])
    async with Capture(settings.rabbitmq_url, names, ["workspace.created.*"]) as capture:
        capsys.readouterr()
        unknown = await eventctl(
            settings,
            "outbox",
            "resend",
            "--database",
            producer_database_url,
            "no-such-event",
            waiting.event_id,
        )
        report = capsys.readouterr()
        assert unknown == 1
        assert "not parked 2" in report.out
        assert "no-such-event is not a parked outbox row" in report.err

        code = await eventctl(
            settings, "outbox", "resend", "--database", producer_database_url, "--all"
        )
        received = await capture.flush()
        report = capsys.readouterr()

    assert code == 0
    assert "selected 2, resent 2, failed 0" in report.out
    assert [m.message_id for m in received] == [r.event_id for r in rows]
    state = {
        r.event_id: (r.published_at is not None, r.parked_at) for r in await outbox_rows(engine)
    }
    assert state == {
        rows[0].event_id: (True, None),
        rows[1].event_id: (True, None),
        waiting.event_id: (False, None),
    }


async def test_the_parked_listing_is_a_table_by_default(
    engine: AsyncEngine, producer_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    row = parked_row()
    await insert_rows(engine, [row, raw_row()])

    code = await main_async(["outbox", "parked", "--database", producer_database_url])
    out = capsys.readouterr().out.splitlines()

    assert code == 0
    assert out[0].split()[:3] == ["SEQ", "EVENT", "ID"]
    assert row.event_id in out[1]
    assert out[1].endswith("Unroutable: no queue bound")
    assert out[-1] == "outbox parked: 1 row(s)"


async def test_a_parked_scheduled_row_is_listed_with_the_time_it_was_due(
    engine: AsyncEngine, producer_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    row = parked_row()
    row.deliver_at = datetime(2026, 11, 24, 8, 0)
    await insert_rows(engine, [row, parked_row()])

    entries = await listed(producer_database_url, capsys)
    code = await main_async(["outbox", "parked", "--database", producer_database_url])
    out = capsys.readouterr().out.splitlines()

    assert [e["deliver_at"] for e in entries] == ["2026-11-24T08:00:00Z", None]
    assert code == 0
    assert "DELIVER AT" in out[0]
    assert "2026-11-24T08:00:00Z" in out[1]


async def test_a_missing_sqlite_database_is_an_error_not_an_empty_listing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'typo.db'}"

    assert await main_async(["outbox", "parked", "--database", url]) == 2
    assert "no SQLite database" in capsys.readouterr().err
