"""Statements shared by the handlers and the API: choices, the inbox lock, upserts."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.messaging.db import now
from tributary.notification.models import InboxHead, Preference
from tributary.notification.preferences import CATEGORIES, CHANNELS, Category, ChannelName


def _insert(session: AsyncSession, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(table)


async def choices_of(
    session: AsyncSession, user_id: str
) -> dict[tuple[Category, ChannelName], bool]:
    """The choices ``user_id`` made (cells with no row take the default)."""
    rows = await session.exec(select(Preference).where(col(Preference.user_id) == user_id))
    found: dict[tuple[Category, ChannelName], bool] = {}
    for row in rows.all():
        for category in CATEGORIES:
            for channel in CHANNELS:
                if (row.category, row.channel) == (category, channel):
                    found[(category, channel)] = row.enabled
    return found


async def lock_inbox(session: AsyncSession, user_id: str) -> int:
    """Lock (creating it) the user's inbox head until the transaction ends; its last seq.

    Every notification for a user takes this lock first, so two transactions about one user
    (competing consumers, replicas) are serialised: sequence numbers commit in order, and the
    second sees what the first wrote.
    """
    table = InboxHead.__table__  # type: ignore[attr-defined]
    statement = (
        _insert(session, table)
        .values(user_id=user_id, last_seq=0)
        .on_conflict_do_update(index_elements=["user_id"], set_={"last_seq": table.c.last_seq})
        .returning(table.c.last_seq)
    )
    result = await session.exec(statement)
    return int(result.scalar_one())


async def set_choice(
    session: AsyncSession, user_id: str, category: Category, channel: ChannelName, on: bool
) -> None:
    """Store one choice (an upsert: two at once cannot collide)."""
    table = Preference.__table__  # type: ignore[attr-defined]
    stamp = now()
    statement = (
        _insert(session, table)
        .values(user_id=user_id, category=category, channel=channel, enabled=on, updated_at=stamp)
        .on_conflict_do_update(
            index_elements=["user_id", "category", "channel"],
            set_={"enabled": on, "updated_at": stamp},
        )
    )
    await session.exec(statement)
