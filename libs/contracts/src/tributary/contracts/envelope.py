"""The CloudEvents 1.0 structured-mode envelope (``application/cloudevents+json``)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tributary.contracts.catalog import NAMESPACE

CONTENT_TYPE = "application/cloudevents+json"
DATA_CONTENT_TYPE = "application/json"
SCHEMA_BASE = "https://schemas.tributary.dev/events/"

D = TypeVar("D")


class MalformedEvent(ValueError):
    """The bytes are not JSON, or the JSON is not a CloudEvent."""


class CloudEvent(BaseModel, Generic[D]):
    """A CloudEvent with Tributary's extensions; ``data`` is a dict or a typed payload."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: str = Field(default="1.0", pattern=r"^1\.0$")
    id: str = Field(min_length=1, max_length=200)
    type: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=500)
    time: datetime
    subject: str | None = None
    datacontenttype: str | None = DATA_CONTENT_TYPE
    dataschema: str | None = None
    idempotencykey: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    data: D

    @property
    def routing_key(self) -> str:
        """``com.tributary.user.created.v1`` → ``user.created.v1``."""
        prefix = NAMESPACE + "."
        return self.type[len(prefix) :] if self.type.startswith(prefix) else self.type

    @property
    def inbox_key(self) -> str:
        """The idempotency key consumers deduplicate on."""
        return self.idempotencykey or f"{self.type}:{self.id}"

    def data_dict(self) -> dict[str, Any]:
        data = self.data
        if isinstance(data, BaseModel):
            dumped: dict[str, Any] = data.model_dump(mode="json", exclude_none=True)
            return dumped
        if isinstance(data, dict):
            return data
        raise TypeError(f"event data must be an object, not {type(data).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready structured-mode representation (``None`` attributes left out)."""
        out: dict[str, Any] = self.model_dump(mode="json", exclude_none=True, exclude={"data"})
        out["data"] = self.data_dict()
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()


Event = CloudEvent


def new_event(
    *,
    routing_key: str,
    source: str,
    data: D,
    subject: str | None = None,
    idempotencykey: str | None = None,
    correlationid: str | None = None,
    causationid: str | None = None,
    event_id: str | None = None,
    time: datetime | None = None,
) -> CloudEvent[D]:
    """A new event of ``routing_key`` (``user.created.v1``) with a fresh id and time."""
    return CloudEvent[D](
        id=event_id or str(uuid.uuid4()),
        type=f"{NAMESPACE}.{routing_key}",
        source=source,
        time=time or datetime.now(UTC),
        subject=subject,
        dataschema=f"{SCHEMA_BASE}{routing_key}.json",
        idempotencykey=idempotencykey,
        correlationid=correlationid,
        causationid=causationid,
        data=data,
    )


def parse_event(body: bytes | str) -> CloudEvent[dict[str, Any]]:
    """Parse structured-mode bytes; :class:`MalformedEvent` says why they are not a CloudEvent."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedEvent(f"body is JSON {type(raw).__name__}, not a CloudEvent object")
    if "data" not in raw:
        raise MalformedEvent("CloudEvent has no 'data' attribute")
    if not isinstance(raw["data"], dict):
        raise MalformedEvent("CloudEvent 'data' must be a JSON object")
    try:
        return CloudEvent[dict[str, Any]].model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "envelope"
        raise MalformedEvent(f"not a CloudEvent: {field}: {first['msg']}") from None
