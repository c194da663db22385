"""The API's request and response bodies, and the opaque list cursor."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated

from fastapi import Path
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
    model_validator,
)

from tributary.notification.models import Notification
from tributary.notification.preferences import Category, ChannelName, Source
from tributary.notification.quiet_window import QuietWindow, parse_zone

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


CLOCK = r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$"


class QuietHours(BaseModel):
    """A daily window, on the clock of a time zone, in which notifications that are not urgent
    wait (in-app ones are stored and streamed at once; email and webhooks wait for its end).
    It may cross midnight (22:00 to 07:00); start and end must differ."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin"}]
        },
    )

    start: StrictStr = Field(
        pattern=CLOCK, description="When they begin: HH:MM (24-hour), or HH:MM:SS"
    )
    end: StrictStr = Field(pattern=CLOCK, description="When they end: HH:MM (24-hour), or HH:MM:SS")
    time_zone: StrictStr = Field(
        min_length=1, max_length=64, description="An IANA time zone: Europe/Berlin"
    )

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        parse_zone(value)
        return value

    @model_validator(mode="after")
    def _valid(self) -> QuietHours:
        self.window()  # ValueError: start and end are the same time
        return self

    def window(self) -> QuietWindow:
        return QuietWindow.parse(self.start, self.end, self.time_zone)

    @classmethod
    def of(cls, window: QuietWindow | None) -> QuietHours | None:
        if window is None:
            return None
        start, end, zone = window.show()
        return cls(start=start, end=end, time_zone=zone)


class PreferencesUpdate(BaseModel):
    """The user's choices; they replace the previous ones (what is left out: the default, and
    no quiet hours)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "categories": {"mentions": {"email": False}, "reports": {"in_app": True}},
                    "quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin"},
                }
            ]
        },
    )

    categories: CategorySwitches = Field(default_factory=CategorySwitches)
    quiet_hours: QuietHours | None = Field(
        default=None, description="Null or left out: no quiet hours"
    )


class PreferencesPublic(BaseModel):
    user_id: str
    categories: dict[Category, dict[ChannelName, bool]] = Field(
        description="Whether each channel is used for each category, all rules applied"
    )
    sources: dict[Category, dict[ChannelName, Source]] = Field(
        description="The rule that decided each: critical > user > default"
    )
    critical: dict[Category, list[ChannelName]] = Field(
        description="The channels of each category that cannot be switched off"
    )
    quiet_hours: QuietHours | None = Field(description="Null: none")


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
