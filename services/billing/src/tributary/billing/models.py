"""Billing's tables: the event store (the write model) and what serves it, and the read models.

``event_store`` is the truth: one row per domain event, append-only (triggers refuse updates
and deletes). Everything else is derived from it or serves it:

* ``data_keys``: one AES key per user; personal data in stored events is encrypted with it,
  and erasing the user deletes the key (crypto-shredding: history is never rewritten).
* ``stream_index``: finds a subscription by something an incoming message names (the payment
  id of ``subscription.activated``); written with the append that introduces the key.
* ``webhook_receipts``: every webhook accepted, by its ``webhook-id`` (the provider's event id)
  and the SHA-256 of its body: a replay is recognised, a replay with another body refused.
* ``projection_state``: each projection's position in the store and the table it serves from.
* ``proj_subscriptions``, ``proj_revenue`` and ``proj_sagas``: the read models (Core tables,
  named through ``projection_state`` so that a rebuild can fill a fresh table and swap it in).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

from tributary.messaging.db import UtcDateTime, now

POSITION = BigInteger().with_variant(Integer(), "sqlite")


class EventRow(SQLModel, table=True):
    __tablename__ = "event_store"
    __table_args__ = (
        UniqueConstraint("stream_id", "version", name="uq_event_store_stream_version"),
        {"sqlite_autoincrement": True},
    )

    position: int | None = Field(
        default=None, sa_column=Column(POSITION, primary_key=True, autoincrement=True)
    )
    """Global order of the store: appends are serialized, so positions commit in order."""
    event_id: str = Field(max_length=36, unique=True)
    stream_id: str = Field(max_length=60)
    version: int
    type: str = Field(max_length=60)
    schema_version: int
    data: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    meta: dict[str, Any] = Field(sa_column=Column("metadata", JSON, nullable=False))
    recorded_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class DataKey(SQLModel, table=True):
    __tablename__ = "data_keys"

    key_id: str = Field(primary_key=True, max_length=40)
    user_id: str = Field(max_length=60, unique=True)
    key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class StreamIndex(SQLModel, table=True):
    __tablename__ = "stream_index"

    kind: str = Field(primary_key=True, max_length=20)
    key: str = Field(primary_key=True, max_length=100)
    stream_id: str = Field(max_length=60)


class WebhookReceipt(SQLModel, table=True):
    __tablename__ = "webhook_receipts"

    webhook_id: str = Field(primary_key=True, max_length=200)
    body_hash: str = Field(max_length=64)
    type: str = Field(max_length=40)
    outcome: str = Field(max_length=20)
    stream_id: str | None = Field(default=None, max_length=60)
    received_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


class ProjectionState(SQLModel, table=True):
    __tablename__ = "projection_state"

    name: str = Field(primary_key=True, max_length=60)
    table_name: str = Field(max_length=60)
    position: int = Field(default=0, sa_column=Column(POSITION, nullable=False))
    """The last store position applied to ``table_name``: each event is applied once."""
    updated_at: datetime = Field(default_factory=now, sa_type=UtcDateTime, nullable=False)


# -- the read models' tables (named through projection_state) -----------------------------------

PROJECTIONS = MetaData()


def subscriptions_table(name: str, metadata: MetaData | None = None) -> Table:
    return Table(
        name,
        metadata if metadata is not None else MetaData(),
        Column("subscription_id", String(60), primary_key=True),
        Column("user_id", String(60), nullable=True),
        Column("plan", String(20), nullable=False),
        Column("status", String(20), nullable=False),
        Column("amount_cents", BigInteger, nullable=False),
        Column("currency", String(3), nullable=False),
        Column("checkout_id", String(40), nullable=True),
        Column("payment_id", String(60), nullable=True),
        Column("refunded_cents", BigInteger, nullable=False),
        Column("version", Integer, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("updated_at", UtcDateTime(), nullable=False),
        Index(f"ix_{name}_user_status", "user_id", "status", "created_at"),
        Index(f"ix_{name}_status", "status", "created_at"),
    )


def revenue_table(name: str, metadata: MetaData | None = None) -> Table:
    return Table(
        name,
        metadata if metadata is not None else MetaData(),
        Column("plan", String(20), primary_key=True),
        Column("currency", String(3), primary_key=True),
        Column("payments", BigInteger, nullable=False),
        Column("gross_cents", BigInteger, nullable=False),
        Column("refunds", BigInteger, nullable=False),
        Column("refunded_cents", BigInteger, nullable=False),
    )


def sagas_table(name: str, metadata: MetaData | None = None) -> Table:
    return Table(
        name,
        metadata if metadata is not None else MetaData(),
        Column("subscription_id", String(60), primary_key=True),
        Column("state", String(30), nullable=False),
        Column("reason", String(500), nullable=True),
        Column("pending_timeout_at", UtcDateTime(), nullable=True),
        Column("version", Integer, nullable=False),
        Column("updated_at", UtcDateTime(), nullable=False),
        Index(f"ix_{name}_state", "state", "updated_at"),
    )


subscriptions_table("proj_subscriptions", PROJECTIONS)
revenue_table("proj_revenue", PROJECTIONS)
sagas_table("proj_sagas", PROJECTIONS)
