from __future__ import annotations

import hashlib
from datetime import datetime

from sqlmodel import Field, SQLModel

from tributary.messaging.db import UtcDateTime, now

MESSAGE_ID_DOMAIN = "tributary.dev"


def _digest(logical_key: str) -> str:
    return hashlib.sha256(logical_key.encode()).hexdigest()


def message_id_for(logical_key: str) -> str:
    """The RFC 5322 Message-ID of a logical email: a resent copy carries the same one."""
    return f"<{_digest(logical_key)[:32]}@{MESSAGE_ID_DOMAIN}>"


def email_id_for(logical_key: str) -> str:
    """The id derives from the logical key: two attempts at one email can only make one row."""
    return f"eml_{_digest(logical_key)[:24]}"


class EmailBase(SQLModel):
    logical_key: str = Field(max_length=200, unique=True, index=True)
    """What makes two sends the same email: ``welcome:{user_id}``, ``send:{request_id}``..."""
    message_id: str = Field(max_length=250)
    to: str = Field(max_length=254, index=True)
    template: str = Field(max_length=40)
    status: str = Field(max_length=10)
    """``sent``, ``failed`` or ``suppressed`` (a welcome to an address that had one within the
    window, or a claimed email whose recipient was erased before it went out); ``sending``: a
    consumer claimed it (committed before the SMTP conversation) and has not settled it yet."""
    user_id: str | None = Field(default=None, max_length=60, index=True)
    correlation_id: str | None = Field(default=None, max_length=200)
    error: str | None = Field(default=None, max_length=500)


class EmailRecord(EmailBase, table=True):
    __tablename__ = "emails"

    id: str = Field(primary_key=True, max_length=60)
    created_at: datetime = Field(default_factory=now)
    sent_at: datetime | None = None
    claimed_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    """When the consumer sending it (``sending``) claimed it; none once settled, or released.
    A claim older than the lease is taken over by the next delivery of the email."""
    claimed_by: str | None = Field(default=None, max_length=32)
    """The claim's random token: only its holder releases it."""


class EmailPublic(EmailBase):
    id: str
    created_at: datetime
    sent_at: datetime | None


class Recipient(SQLModel, table=True):
    """Who a user id mails to: events such as subscription.activated carry only the id."""

    __tablename__ = "recipients"

    user_id: str = Field(primary_key=True, max_length=60)
    email: str = Field(max_length=254)
    given_name: str = Field(max_length=200)
    locale: str = Field(max_length=10)
    updated_at: datetime = Field(default_factory=now)
    email_changed_at: datetime | None = Field(default=None, sa_type=UtcDateTime, nullable=True)
    """``changed_at`` of the user.email_changed that ``email`` comes from (none: from
    user.created); an address change not later than this is older news and is ignored."""


class WelcomeSend(SQLModel, table=True):
    """When an address last got a welcome email, by a keyed hash of the address (never the
    address itself): sign-up cannot be used to mail one address again and again. It outlives
    the erasure of the users who had the address, holding nothing that identifies them."""

    __tablename__ = "welcome_sends"

    address_hash: str = Field(primary_key=True, max_length=64)
    """HMAC-SHA256 (hex) of the normalised address, with the service's address key."""
    last_sent_at: datetime = Field(sa_type=UtcDateTime, nullable=False)


ERASED_ADDRESS = "[erased]"
"""What ``to`` becomes in the records of an erased user's emails."""
