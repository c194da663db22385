"""The webhook channel's tables: endpoints, deliveries (one per notification and endpoint) and
the attempts made for each delivery (the delivery log)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from tributary.messaging.db import UtcDateTime, now

SEQ = BigInteger().with_variant(Integer(), "sqlite")


class WebhookEndpoint(SQLModel, table=True):
    """An HTTPS endpoint a user registered: notifications are POSTed to it, signed."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_user", "user_id"),)

    id: str = Field(primary_key=True, max_length=40)
    """``wh_…``"""
    user_id: str = Field(max_length=60)
    url: str = Field(max_length=2048)
    description: str | None = Field(default=None, max_length=200)
    categories: str | None = Field(default=None, max_length=100)
    """The categories it receives, comma-separated; none: every category."""
    secret: str = Field(max_length=100)
    """``whsec_…``: signs every delivery. Shown once (creation, rotation); never logged."""
    previous_secret: str | None = Field(default=None, max_length=100)
    """The secret before the last rotation: still signs until ``previous_secret_until``."""
    previous_secret_until: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    enabled: bool = True
    disabled_reason: str | None = Field(default=None, max_length=20)
    """``gone`` (it answered 410) or ``failing`` (no success for the disable period)."""
    disabled_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    failing_since: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    """The first failed attempt since the last success (or since it was enabled)."""
    last_success_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
    updated_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class WebhookDelivery(SQLModel, table=True):
    """One notification for one endpoint: made once per source and endpoint, so redeliveries
    and duplicate announcements never make a second one. Its ``id`` is the ``webhook-id``
    header of every attempt (receivers deduplicate by it)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "source", name="uq_webhook_deliveries_source"),
        UniqueConstraint("id", name="uq_webhook_deliveries_id"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "seq"),
        Index("ix_webhook_deliveries_user", "user_id"),
    )

    seq: int | None = Field(
        default=None, sa_column=Column(SEQ, primary_key=True, autoincrement=True)
    )
    """Orders the delivery log (newest first) and its cursor."""
    id: str = Field(max_length=40)
    """``msg_…``: the ``webhook-id``, the same for every attempt and re-send."""
    endpoint_id: str = Field(max_length=40)
    user_id: str = Field(max_length=60)
    source: str = Field(max_length=200)
    category: str = Field(max_length=20)
    event_id: str = Field(max_length=200)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    """The JSON body, exactly as signed and sent (the same on every attempt)."""
    status: str = Field(default="pending", max_length=20)
    """``pending`` (attempts to come), ``succeeded`` or ``failed`` (none left)."""
    attempts: int = 0
    """Attempts made, scheduled and manual."""
    next_attempt: int | None = 1
    """The number of the scheduled attempt expected next (1 is the first); none: no more."""
    next_attempt_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    resends: int = 0
    """Manual re-sends asked for."""
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
    updated_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class WebhookAttempt(SQLModel, table=True):
    """One HTTP request (or a refusal to make it) for a delivery."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        UniqueConstraint("delivery_id", "job", name="uq_webhook_attempts_job"),
        Index("ix_webhook_attempts_user", "user_id"),
    )

    seq: int | None = Field(
        default=None, sa_column=Column(SEQ, primary_key=True, autoincrement=True)
    )
    delivery_id: str = Field(max_length=40)
    endpoint_id: str = Field(max_length=40)
    user_id: str = Field(max_length=60)
    job: str = Field(max_length=20)
    """Which job made it: ``3`` (the third scheduled attempt) or ``r1`` (the first re-send);
    a job that arrives again finds its attempt made."""
    attempted_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)
    duration_ms: int | None = None
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=40)
    """Why it failed without a status (``timeout``, ``connect_error``, ``forbidden_address``…)."""
    detail: str | None = Field(default=None, max_length=300)
    succeeded: bool = False
