"""The API's request and response bodies, and the opaque list cursor."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from tributary.notification.models import Notification
from tributary.notification.preferences import Category, ChannelName, Source

UserIdPath = Annotated[
    str, Path(pattern=r"^usr_[A-Za-z0-9]{8,40}$", description="The user (`usr_…`)")
]
MAX_SEQ = 2**63 - 1


class NotificationPublic(BaseModel):
    id: int = Field(description="Numbers the user's notifications in order; the stream's event id")
    category: Category
    urgent: bool
    title: str
    body: str
    url: str | None = Field(description="Where the notification's subject can be seen")
    created_at: datetime
    read_at: datetime | None

    @classmethod
    def of(cls, row: Notification) -> NotificationPublic:
        return cls(
            id=row.seq,
            category=row.category,  # type: ignore[arg-type]  # written from Category only
            urgent=row.urgent,
            title=row.title,
            body=row.body,
            url=row.url,
            created_at=row.created_at,
            read_at=row.read_at,
        )


class NotificationPage(BaseModel):
    items: list[NotificationPublic] = Field(description="Newest first")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page"
    )


class MarkedRead(BaseModel):
    marked: int = Field(description="Notifications that were unread and are read now")


class ChannelSwitches(BaseModel):
    """On (true) or off (false) per channel; a channel left out takes the default."""

    model_config = ConfigDict(extra="forbid")

    in_app: StrictBool | None = None
    email: StrictBool | None = None
    webhook: StrictBool | None = None


class CategorySwitches(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account: ChannelSwitches | None = None
    billing: ChannelSwitches | None = None
    mentions: ChannelSwitches | None = None
    reports: ChannelSwitches | None = None


class PreferencesUpdate(BaseModel):
    """The user's choices; they replace the previous ones (what is left out: the default)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"categories": {"mentions": {"email": False}, "reports": {"in_app": True}}}
            ]
        },
    )

    categories: CategorySwitches = Field(default_factory=CategorySwitches)


class PreferencesPublic(BaseModel):
    user_id: str
    categories: dict[Category, dict[ChannelName, bool]] = Field(
        description="Whether each channel is used for each category, all rules applied"
    )
    sources: dict[Category, dict[ChannelName, Source]] = Field(
        description="The rule that decided each: critical > user > default"
    )
    critical: list[Category] = Field(description="Categories that cannot be switched off")


# -- the cursor ----------------------------------------------------------------------------

_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,40}")
_POSITION = re.compile(r"n1:([1-9][0-9]{0,18})")


def make_cursor(before: int) -> str:
    """An opaque cursor for the notifications older than ``before``."""
    return base64.urlsafe_b64encode(f"n1:{before}".encode()).rstrip(b"=").decode()


def parse_cursor(cursor: str) -> int:
    """The position a cursor of :func:`make_cursor` stands for; ValueError for anything else."""
    if not _CURSOR.fullmatch(cursor):
        raise ValueError("not a cursor")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise ValueError("not a cursor") from None
    match = _POSITION.fullmatch(text)
    if match is None or int(match.group(1)) > MAX_SEQ or make_cursor(int(match.group(1))) != cursor:
        raise ValueError("not a cursor")
    return int(match.group(1))
