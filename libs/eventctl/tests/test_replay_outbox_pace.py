"""``eventctl replay outbox`` with the progress bar, ``--rate`` and Ctrl-C (SQLite producer)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from rich.console import Console
from sqlalchemy import update

from libs.contracts.tests.samples import sample
from tributary.contracts.events import UserCreatedV2
from tributary.eventctl import progress
from tributary.eventctl.progress import EXIT_INTERRUPTED
from tributary.messaging.db import (
    OutboxRow,
    create_engine,
    create_runtime_tables,
    session_factory,
    utcnow,
)
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import queue_depth
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.waiting import eventually

from .helpers import eventctl

pytestmark = pytest.mark.broker

TARGET = "target"


async def producer_database(path: Path, events: int) -> str:
    """An SQLite producer database with ``events`` published user.created.v2 rows."""
    url = f"sqlite+aiosqlite:///{path}"
    engine = create_engine(url)
    try:
        await create_runtime_tables(engine)
        async with UnitOfWork(session_factory(engine)(), "/services/identity") as uow:
            for _ in range(events):
                user = sample("user.created.v2", user_id=f"usr_{uuid.uuid4().hex[:12]}")
                uow.outbox.add(UserCreatedV2.model_validate(user))
            await uow.commit()
        async with engine.begin() as conn:
            await conn.execute(update(OutboxRow).values(published_at=utcnow()))
    finally:
        await engine.dispose()
    return url


@pytest.fixture
async def target(settings: MessagingSettings) -> AsyncIterator[str]:
    name = f"{settings.name_prefix}{TARGET}.events"
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name)
        try:
            yield name
        finally:
            await channel.queue_delete(name)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(
        progress, "stderr_console", lambda: Console(file=out, force_terminal=True, width=160)
    )
    return out


def replay_args(database: str) -> list[str]:
    return ["replay", "outbox", "--database", database, "--type", "user.created"]


async def test_a_replay_draws_its_bar_at_the_rate_asked(
    settings: MessagingSettings,
    target: str,
    tmp_path: Path,
    drawn: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database = await producer_database(tmp_path / "producer.db", 12)

    code = await eventctl(
        settings, *replay_args(database), "--to-service", TARGET, "--rate", "1000", "--batch", "5"
    )

    assert code == 0
    assert "republished 12" in capsys.readouterr().out
    assert f"replay -> {target}" in drawn.getvalue()
    assert "12/12" in drawn.getvalue()
    assert await queue_depth(settings.rabbitmq_url, target) == 12


async def test_ctrl_c_stops_the_replay_after_the_publishes_under_way(
    settings: MessagingSettings,
    target: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database = await producer_database(tmp_path / "producer.db", 200)

    async def press_ctrl_c() -> None:
        async def under_way() -> bool:
            return await queue_depth(settings.rabbitmq_url, target) >= 20

        await eventually(under_way, timeout=20, what="the replay under way")
        os.kill(os.getpid(), signal.SIGINT)

    pressing = asyncio.create_task(press_ctrl_c())
    code = await eventctl(
        settings, *replay_args(database), "--to-service", TARGET, "--rate", "200", "--batch", "10"
    )
    await pressing

    out = capsys.readouterr().out
    assert code == EXIT_INTERRUPTED
    assert out.startswith("interrupted (Ctrl-C)")
    republished = int(out.split("republished ", 1)[1].split(",", 1)[0])
    assert 20 <= republished < 200
    assert "failed 0" in out

    async def all_arrived() -> bool:
        return await queue_depth(settings.rabbitmq_url, target) == republished

    await eventually(all_arrived, timeout=10, what=f"{republished} replayed copies")
