"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from tributary.contracts.events import Plan, Role

# The HTML standard's "valid email address" (what browsers accept in <input type=email>), with
# at least one dot in the domain: stricter than the contracts' ``format: email`` check, so an
# address accepted here never fails the event schema later.
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)


def _valid_email(value: str) -> str:
    if not _EMAIL.fullmatch(value):
        raise ValueError("is not a valid email address")
    return value


Email = Annotated[str, Field(max_length=254), AfterValidator(_valid_email)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Locale = Annotated[str, Field(pattern=r"^[a-z]{2}-[A-Z]{2}$", examples=["en-GB"])]


class Request(BaseModel):
    """Unknown fields are refused, so a misspelt or read-only field is not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class UserCreate(Request):
    email: Email
    name: Name
    plan: Plan = "free"
    locale: Locale


class UserUpdate(Request):
    """Only the fields present change; ``null`` is refused rather than read as "no change"."""

    email: Email | None = None
    name: Name | None = None
    locale: Locale | None = None

    @field_validator("email", "name", "locale")
    @classmethod
    def _not_null(cls, value: str | None) -> str | None:
        if value is None:
            raise ValueError("may be left out, not set to null")
        return value


class RoleChange(Request):
    role: Role


class ApiKeyCreate(Request):
    name: Annotated[str | None, StringConstraints(max_length=100)] = None


class UserPublic(BaseModel):
    id: str
    email: str
    name: str
    plan: Plan
    locale: str
    role: Role
    created_at: datetime
    updated_at: datetime


class ApiKeyPublic(BaseModel):
    id: str
    user_id: str
    name: str | None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyIssued(ApiKeyPublic):
    secret: str = Field(description="Shown once: only its hash is stored.")
