"""``eventctl replay outbox`` from a producer's outbox (SQLite and PostgreSQL) to one consumer.

Two services consume ``user.created``; the replay must reach only the one it names, marked as
a replay, and only the published rows of the asked type and time range.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from libs.contracts.tests.samples import sample
from tributary.contracts.events import Payload, UserCreatedV1, UserCreatedV2, WorkspaceCreatedV1
from tributary.eventctl.replay import REPLAY_FORCED
from tributary.messaging import headers
from tributary.messaging.bus import Bus
from tributary.messaging.db import (
    OutboxRow,
    create_engine,
    create_runtime_tables,
    session_factory,
    utcnow,
)
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import read_queue, started_bus
from tributary.messaging.uow import UnitOfWork

from .helpers import Handler, eventctl, messages_in, publish, user_created

pytestmark = pytest.mark.broker

TARGET, BYSTANDER = "target", "bystander"


@dataclass
class Producer:
    """The producing service's database: events written through its outbox."""

    url: str
    engine: AsyncEngine

    async def emit(
        self, payload: Payload, *, published: bool = True, age: timedelta | None = None
    ) -> str:
        async with UnitOfWork(session_factory(self.engine)(), "/services/identity") as uow:
            event = uow.outbox.add(payload)
            await uow.commit()
        values: dict[str, Any] = {}
        if published:  # as the relay marks a row after the broker's confirm
            values["published_at"] = utcnow()
        if age is not None:
            values["created_at"] = utcnow() - age
        if values:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(OutboxRow).where(col(OutboxRow.event_id) == event.id).values(**values)
                )
        return event.id


def new_user(version: int = 2) -> Payload:
    user_id = f"usr_{uuid.uuid4().hex[:12]}"
    if version == 1:
        return UserCreatedV1.model_validate(sample("user.created.v1", user_id=user_id))
    return UserCreatedV2.model_validate(sample("user.created.v2", user_id=user_id))


@pytest.fixture
async def producer(producer_database_url: str) -> AsyncIterator[Producer]:
    engine = create_engine(producer_database_url)
    yield Producer(producer_database_url, engine)
    await engine.dispose()


def replay_args(producer: Producer, *extra: str) -> list[str]:
    return [
        "replay",
        "outbox",
        "--database",
        producer.url,
        "--type",
        "user.created",
        "--to-service",
        TARGET,
        *extra,
    ]


async def test_outbox_replay_reaches_only_the_named_service_marked_as_replay(
    producer: Producer,
    consumer_engine: AsyncEngine,
    settings: MessagingSettings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    v2 = await producer.emit(new_user(2))
    v1 = await producer.emit(new_user(1))
    await producer.emit(new_user(), age=timedelta(days=2))  # before --from
    await producer.emit(new_user(), published=False)  # the relay has not sent it yet
    await producer.emit(WorkspaceCreatedV1.model_validate(sample("workspace.created.v1")))
    since = (utcnow() - timedelta(days=1)).isoformat() + "Z"

    target, bystander = Handler(), Handler()
    bystander_engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'bystander.db'}")
    await create_runtime_tables(bystander_engine)
    target_bus = Bus(TARGET, consumer_engine, handlers={UserCreatedV2: target}, settings=settings)
    bystander_bus = Bus(
        BYSTANDER, bystander_engine, handlers={UserCreatedV2: bystander}, settings=settings
    )
    try:
        async with started_bus(target_bus) as seen, started_bus(bystander_bus) as unseen:
            assert await eventctl(settings, *replay_args(producer, "--from", since)) == 0
            await seen.wait_until_handled(v2)
            await seen.wait_until_handled(v1)

            # a live event after the replay: once the bystander has it, anything replayed to
            # it before would have been handled first
            live = user_created()
            await publish(settings, live)
            await unseen.wait_until_handled(live["id"])
    finally:
        await bystander_engine.dispose()

    assert capsys.readouterr().out.strip() == (
        f"replay outbox user.created -> {settings.name_prefix}{TARGET}.events: selected 2, "
        "republished 2, duplicate unknown (the consumer's inbox counts already-processed "
        "events as duplicates), failed 0, skipped 1 (not yet published: the relay delivers "
        "them, or parked: see eventctl outbox parked)"
    )
    assert [c.event_id for c in bystander.calls] == [live["id"]]
    replayed = [c for c in target.calls if c.event_id in {v1, v2}]
    assert sorted(c.event_id for c in replayed) == sorted([v1, v2])
    assert all(c.is_replay for c in replayed)
    assert [r.replay for r in seen.of(v2)] == [True]


async def test_forced_replay_marks_each_copy_and_keeps_the_envelope_properties(
    producer: Producer, consumer_engine: AsyncEngine, settings: MessagingSettings
) -> None:
    event_id = await producer.emit(new_user())
    bus = Bus(TARGET, consumer_engine, handlers={UserCreatedV2: Handler()}, settings=settings)
    async with started_bus(bus, consume=False):
        assert await eventctl(settings, *replay_args(producer, "--force")) == 0
        [copy] = await read_queue(settings.rabbitmq_url, f"{settings.name_prefix}{TARGET}.events")

    assert copy.message_id == event_id
    assert copy.headers[headers.REPLAY] == "1"
    assert copy.headers[REPLAY_FORCED] == "1"
    assert copy.headers[headers.ROUTING_KEY] == "user.created.v2"
    assert copy.properties["type"] == "com.tributary.user.created.v2"
    assert copy.properties["app_id"] == "identity"
    assert copy.properties["content_type"] == "application/cloudevents+json"


async def test_a_dry_run_of_an_outbox_replay_publishes_nothing(
    producer: Producer,
    consumer_engine: AsyncEngine,
    settings: MessagingSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await producer.emit(new_user())
    await producer.emit(new_user())
    bus = Bus(TARGET, consumer_engine, handlers={UserCreatedV2: Handler()}, settings=settings)
    async with started_bus(bus, consume=False):
        assert await eventctl(settings, *replay_args(producer, "--dry-run")) == 0
        depth = await messages_in(settings.rabbitmq_url, f"{settings.name_prefix}{TARGET}.events")

    assert depth == 0
    assert "selected 2, republished 0 (dry run: would have republished 2)" in (
        capsys.readouterr().out
    )


async def test_replaying_events_the_consumer_already_processed_ends_as_duplicates(
    producer: Producer, consumer_engine: AsyncEngine, settings: MessagingSettings
) -> None:
    event_id = await producer.emit(new_user())
    handler = Handler()
    bus = Bus(TARGET, consumer_engine, handlers={UserCreatedV2: handler}, settings=settings)
    async with started_bus(bus) as outcomes:
        assert await eventctl(settings, *replay_args(producer)) == 0
        await outcomes.wait_until_handled(event_id)
        assert await eventctl(settings, *replay_args(producer)) == 0
        await outcomes.wait_until_handled(event_id, "duplicate")

    assert [c.event_id for c in handler.calls] == [event_id]


async def test_a_missing_sqlite_database_is_an_error_not_an_empty_replay(
    settings: MessagingSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.db"
    args = ["replay", "outbox", "--database", f"sqlite:///{missing}", "--type", "user.created"]

    assert await eventctl(settings, *args, "--to-service", TARGET) == 2

    assert "no SQLite database" in capsys.readouterr().err
    assert not missing.exists()
