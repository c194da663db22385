from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import func, select

from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.testing import OutcomeRecorder, delete_prefixed, isolated_settings

from .conftest import Thing, on_user_created, user_created_round_trip


@pytest.fixture
async def bus(engine: AsyncEngine, broker_url: str) -> AsyncIterator[tuple[Bus, OutcomeRecorder]]:
    bus = Bus(
        "probe",
        engine,
        handlers={UserCreatedV2: on_user_created},
        settings=isolated_settings(broker_url),
    )
    recorder = OutcomeRecorder()
    bus.listeners.append(recorder)
    await bus.start()
    yield bus, recorder
    await bus.stop()
    qs = bus.names.service_queues("probe", len(bus.settings.retry_tiers))
    await delete_prefixed(broker_url, bus.names, [qs.work, qs.dlq, *qs.retries])


async def test_an_event_written_to_the_outbox_is_handled_once(
    bus: tuple[Bus, OutcomeRecorder], engine: AsyncEngine
) -> None:
    await user_created_round_trip(*bus)
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(Thing))).scalar_one() == 1
