from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import func, select

from tributary.contracts.envelope import CloudEvent
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.testing import OutcomeRecorder, delete_prefixed, isolated_settings
from tributary.messaging.uow import UnitOfWork

from .conftest import Thing


async def on_user_created(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
    uow.session.add(Thing(event_id=event.id, user_id=event.data.user_id))


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
    b, recorder = bus
    async with b.unit_of_work() as uow:
        event = uow.outbox.add(
            UserCreatedV2(
                user_id="usr_0123456789",
                email="ada@example.com",
                given_name="Ada",
                family_name="Lovelace",
                plan="free",
                locale="en-GB",
                created_at=datetime.now(UTC),
            )
        )
        await uow.commit()
    await recorder.wait_until_handled(event.id)
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(Thing))).scalar_one() == 1
