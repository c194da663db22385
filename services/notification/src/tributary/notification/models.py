from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

from tributary.messaging.db import UtcDateTime, now

SEQ = BigInteger().with_variant(Integer(), "sqlite")


class Address(SQLModel, table=True):
    """Where a user's mail goes: the events to notify about carry only the user id."""

    __tablename__ = "addresses"

    user_id: str = Field(primary_key=True, max_length=60)
    email: str = Field(max_length=254)
    locale: str = Field(max_length=10)
    updated_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
    email_changed_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    """``changed_at`` of the user.email_changed that ``email`` comes from (none: from
    user.created); an address change not later than this is older news and is ignored."""


class Preference(SQLModel, table=True):
    """One choice a user made: a category on one channel, on or off."""

    __tablename__ = "preferences"

    user_id: str = Field(primary_key=True, max_length=60)
    category: str = Field(primary_key=True, max_length=20)
    channel: str = Field(primary_key=True, max_length=20)
    enabled: bool
    updated_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class InboxHead(SQLModel, table=True):
    """The last in-app sequence number given to a user. Its row is locked while a
    notification for the user is written, so one user's numbers are committed in order: a
    stream reading ``seq > last sent`` never skips one committed late."""

    __tablename__ = "inbox_heads"

    user_id: str = Field(primary_key=True, max_length=60)
    last_seq: int = Field(default=0, sa_column=Column(SEQ, nullable=False))


class Notification(SQLModel, table=True):
    """An in-app notification. ``seq`` numbers a user's notifications (1, 2, ...): it is the
    id in the API and the event id on the stream."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("user_id", "source", name="uq_notifications_source"),)

    user_id: str = Field(primary_key=True, max_length=60)
    seq: int = Field(sa_column=Column(SEQ, primary_key=True, autoincrement=False))
    category: str = Field(max_length=20)
    urgent: bool = False
    """Delivered even in quiet hours (critical categories are urgent)."""
    title: str = Field(max_length=200)
    body: str = Field(max_length=1000)
    url: str | None = Field(default=None, max_length=2048)
    source: str = Field(max_length=200)
    """What the notification is about, the same whatever event id announced it:
    ``comment.mentioned:{comment_id}``, ``report.ready:{report_id}``..."""
    event_id: str = Field(max_length=200)
    """The CloudEvent that made it (the first one, if it was announced again)."""
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
    read_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)


class Delivery(SQLModel, table=True):
    """A notification sent through a channel other than in-app (an ``email.send`` staged):
    one per source, user and channel, so no redelivery sends twice."""

    __tablename__ = "deliveries"

    user_id: str = Field(primary_key=True, max_length=60)
    source: str = Field(primary_key=True, max_length=200)
    channel: str = Field(primary_key=True, max_length=20)
    category: str = Field(max_length=20)
    event_id: str = Field(max_length=200)
    reference: str = Field(max_length=200)
    """What the channel made: the ``email.send`` request id."""
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
