"""The outbox refuses an event no consumer would take: over the envelope's body limit."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tributary.contracts.envelope import MAX_BODY_BYTES
from tributary.contracts.events import EmailSendV1
from tributary.messaging.db import session_factory
from tributary.messaging.uow import UnitOfWork

from .conftest import prepared_engine


def command(variables: int) -> EmailSendV1:
    return EmailSendV1(
        request_id=uuid.uuid4(),
        to="ada@example.com",
        template="welcome",
        subject="Hello",
        variables={f"v{n}": "x" * 2000 for n in range(variables)},
    )


async def test_an_event_over_the_body_limit_is_refused_when_written(tmp_path: Path) -> None:
    engine = await prepared_engine(f"sqlite+aiosqlite:///{tmp_path / 'limits.db'}")
    try:
        async with session_factory(engine)() as session:
            uow = UnitOfWork(session, "/tests")
            uow.outbox.add(command(10))  # 20 KB: fine
            too_many = MAX_BODY_BYTES // 2000 + 1
            with pytest.raises(ValueError, match="exceeds"):
                uow.outbox.add(command(too_many))
            assert uow.outbox.added == 1
    finally:
        await engine.dispose()
