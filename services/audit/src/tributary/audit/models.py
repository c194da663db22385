from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Integer
from sqlmodel import Field, SQLModel

from tributary.messaging.db import UtcDateTime


class AuditEntry(SQLModel, table=True):
    """One recorded event. Rows are only ever inserted (triggers reject UPDATE and DELETE)."""

    __tablename__ = "audit_entries"

    seq: int = Field(
        default=0,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False
        ),
    )
    """Gapless from 1, assigned with ``prev_hash`` and ``hash`` by ``chain.append``."""
    event_id: str = Field(max_length=200, index=True)
    type: str = Field(max_length=200, index=True)
    """The CloudEvents type as received (``com.tributary.user.created.v1``)."""
    data_type: str = Field(max_length=200)
    """The routing key whose schema ``data`` follows: the handler's version, after upcasting."""
    source: str = Field(max_length=500)
    subject: str | None = Field(default=None, index=True)
    correlation_id: str | None = Field(default=None, index=True)
    causation_id: str | None = None
    event_time: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False, index=True))
    recorded_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    data: dict[str, Any] = Field(sa_column=Column(JSON(), nullable=False))
    """The payload with every PII field masked (or replaced by a keyed hash)."""
    prev_hash: str = Field(default="", max_length=64, unique=True)
    hash: str = Field(default="", max_length=64, unique=True)
    trace_id: str | None = Field(default=None, max_length=32)
    """The trace id of the event's ``traceparent`` (32 hex digits), to find its trace: a
    pointer for people, not evidence, so outside the hash (entries before it have none)."""


class AuditCheckpoint(SQLModel, table=True):
    """A signed head of the chain (see ``checkpoints``); also published as an event."""

    __tablename__ = "audit_checkpoints"

    seq: int = Field(
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False
        ),
    )
    head: str = Field(max_length=64)
    signed_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    key_id: str = Field(max_length=16)
    public_key: str = Field(max_length=43)
    signature: str = Field(max_length=86)


class AuditCheckpointPublic(SQLModel):
    seq: int
    head: str
    signed_at: datetime
    key_id: str
    public_key: str
    signature: str


class CheckpointPage(SQLModel):
    checkpoints: list[AuditCheckpointPublic]
    """Newest first."""


class SigningKey(SQLModel):
    key_id: str
    public_key: str
    """The raw Ed25519 public key, base64url without padding."""
    algorithm: str = "Ed25519"


class CheckpointRef(SQLModel):
    seq: int
    head: str


class AuditEntryPublic(SQLModel):
    seq: int
    event_id: str
    type: str
    data_type: str
    source: str
    subject: str | None
    correlation_id: str | None
    causation_id: str | None
    event_time: datetime
    recorded_at: datetime
    data: dict[str, Any]
    prev_hash: str
    hash: str
    trace_id: str | None = None


class AuditPage(SQLModel):
    entries: list[AuditEntryPublic]
    next: str | None = None
    """Pass as ``cursor`` for the following page; null when there is nothing more yet."""


class Verification(SQLModel):
    ok: bool
    entries: int
    """Entries checked: all of them when ``ok``, those before the broken one otherwise."""
    head: str | None = None
    """Hash of the last entry when ``ok``: keep it elsewhere to detect truncation later."""
    broken_at: int | None = None
    reason: str | None = None
    checkpoint: CheckpointRef | None = None
    """The latest signed checkpoint the chain was checked against (None: there is none yet)."""
