"""The outbox refuses an event no consumer would take: over the envelope's body limit."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import col, select

from tributary.contracts.envelope import MAX_BODY_BYTES
from tributary.contracts.events import EmailSendV1
from tributary.messaging.db import OutboxRow, session_factory
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


async def test_the_events_of_a_transaction_are_inserted_in_one_statement(tmp_path: Path) -> None:
    # on SQLite too: the outbox's event_id sorts the rows a multi-row INSERT ... RETURNING
    # gives back, so SQLAlchemy need not insert them one statement each
    engine = await prepared_engine(f"sqlite+aiosqlite:///{tmp_path / 'many.db'}")
    inserts: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO tributary_outbox"):
            inserts.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with session_factory(engine)() as session:
            uow = UnitOfWork(session, "/tests")
            staged = [uow.outbox.add(command(1)) for _ in range(25)]
            await uow.commit()
            rows = (await session.exec(select(OutboxRow).order_by(col(OutboxRow.seq)))).all()
        assert len(inserts) == 1
        assert [r.event_id for r in rows] == [e.id for e in staged]  # in the order written
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
        await engine.dispose()
