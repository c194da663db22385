"""The tables of quiet hours and digests, and the erasure of what they keep about a user."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, delete, text
from sqlmodel import Field, SQLModel, col
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.messaging.db import UtcDateTime, now


class QuietHoursRow(SQLModel, table=True):
    """A user's quiet hours (no row: none)."""

    __tablename__ = "quiet_hours"

    user_id: str = Field(primary_key=True, max_length=60)
    start: str = Field(max_length=8)
    """``HH:MM`` (or ``HH:MM:SS``) on the clock of ``time_zone``."""
    end: str = Field(max_length=8)
    time_zone: str = Field(max_length=64)
    """An IANA name: ``Europe/Berlin``."""
    updated_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class HeldDelivery(SQLModel, table=True):
    """A notification one channel will deliver when the user's quiet hours end: one per user,
    source and channel (a redelivery holds nothing more). The deliver job due at
    ``release_at`` (a scheduled ``notification.job``) delivers it and deletes the row."""

    __tablename__ = "held_deliveries"
    __table_args__ = (Index("ix_held_deliveries_release", "user_id", "release_at"),)

    user_id: str = Field(primary_key=True, max_length=60)
    source: str = Field(primary_key=True, max_length=200)
    channel: str = Field(primary_key=True, max_length=20)
    category: str = Field(max_length=20)
    title: str = Field(max_length=200)
    body: str = Field(max_length=2000)
    url: str | None = Field(default=None, max_length=2048)
    event_id: str = Field(max_length=200)
    release_at: datetime = Field(sa_type=UtcDateTime, nullable=False)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class Digest(SQLModel, table=True):
    """The mentions of one user within one window, mailed as one email when it closes.

    At most one digest per user is open (``closed_at`` null): a partial unique index says so
    to the database, and every writer takes the user's inbox lock first, so two transactions
    never both open one, and a close and an add happen one after the other.
    """

    __tablename__ = "digests"
    __table_args__ = (
        Index("ix_digests_user", "user_id"),
        Index(
            "uq_digests_open",
            "user_id",
            unique=True,
            sqlite_where=text("closed_at IS NULL"),
            postgresql_where=text("closed_at IS NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    """``dg_…``; the digest's email request id is derived from it."""
    user_id: str = Field(max_length=60)
    opened_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
    closes_at: datetime = Field(sa_type=UtcDateTime, nullable=False)
    """When its digest job is due: the end of the window the first mention opened."""
    closed_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    mentions: int = 0
    """How many mentions it listed (set when it closes)."""


class DigestItem(SQLModel, table=True):
    """One mention in a digest: one per user and source, so a mention redelivered or announced
    again is never listed twice, in this digest or a later one."""

    __tablename__ = "digest_items"
    __table_args__ = (Index("ix_digest_items_digest", "digest_id"),)

    user_id: str = Field(primary_key=True, max_length=60)
    source: str = Field(primary_key=True, max_length=200)
    digest_id: str = Field(max_length=40)
    url: str | None = Field(default=None, max_length=2048)
    event_id: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


async def forget(session: AsyncSession, user_id: str) -> int:
    """Delete the user's quiet hours, held deliveries, digests and their items (erasure); the
    scheduled jobs about them go with the outbox purge, and find nothing if they ran."""
    removed = 0
    for table in (QuietHoursRow, HeldDelivery, DigestItem, Digest):
        result = await session.exec(delete(table).where(col(table.user_id) == user_id))
        removed += result.rowcount or 0
    return removed
