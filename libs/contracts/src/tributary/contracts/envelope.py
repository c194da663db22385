"""The CloudEvents 1.0 structured-mode envelope (``application/cloudevents+json``)."""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from tributary.contracts.catalog import NAMESPACE

CONTENT_TYPE = "application/cloudevents+json"
DATA_CONTENT_TYPE = "application/json"
SCHEMA_BASE = "https://schemas.tributary.dev/events/"

MAX_BODY_BYTES = 1024 * 1024
"""Largest body :func:`parse_event` accepts (1 MiB); a larger one is malformed, unread."""
MAX_DEPTH = 32
"""Deepest nesting of JSON objects and arrays accepted, the envelope itself counting as 1."""
MAX_ID_LENGTH = 200
"""Longest ``id``, ``type``, ``idempotencykey``, ``correlationid``: they fit the inbox columns."""

# CloudEvents 1.0: attribute names are ASCII lower-case letters and digits; String values must
# not hold control characters, surrogates or noncharacters.
_EXTENSION_NAME = re.compile(r"[a-z0-9]+")
_NONCHARACTERS = "".join(chr(plane << 16 | low) for plane in range(17) for low in (0xFFFE, 0xFFFF))
_NOT_ALLOWED_IN_STRINGS = re.compile(
    r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef" + _NONCHARACTERS + "]"
)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_INT32 = range(-(2**31), 2**31)
_SEQUENCE = re.compile(r"0|[1-9][0-9]{0,17}")
"""The ``sequence`` extension: a non-negative decimal integer below 10**18, as a string."""

D = TypeVar("D")


class MalformedEvent(ValueError):
    """The bytes are not JSON, or the JSON is not a CloudEvent."""


class CloudEvent(BaseModel, Generic[D]):
    """A CloudEvent with Tributary's extensions; ``data`` is a dict or a typed payload."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: str = Field(default="1.0", pattern=r"^1\.0$")
    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    type: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    source: str = Field(min_length=1, max_length=500)
    time: AwareDatetime
    """RFC 3339 requires an offset; a naive time would be read in the consumer's local zone."""
    subject: str | None = Field(default=None, max_length=500)
    datacontenttype: str | None = DATA_CONTENT_TYPE
    dataschema: str | None = Field(default=None, max_length=2048)
    idempotencykey: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    correlationid: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    causationid: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    traceparent: str | None = Field(default=None, max_length=512)
    tracestate: str | None = Field(default=None, max_length=512)
    data: D

    @field_validator("time")
    @classmethod
    def _in_utc_range(cls, value: datetime) -> datetime:
        # 0001-01-01T00:00:00+05:00 parses, but converting it to UTC overflows
        try:
            value.astimezone(UTC)
        except (OverflowError, ValueError):
            raise ValueError("time is out of range once converted to UTC") from None
        return value

    @property
    def routing_key(self) -> str:
        """``com.tributary.user.created.v1`` → ``user.created.v1``."""
        prefix = NAMESPACE + "."
        return self.type[len(prefix) :] if self.type.startswith(prefix) else self.type

    @property
    def partitionkey(self) -> str | None:
        """The CloudEvents ``partitionkey`` extension: the entity the event is about."""
        value = (self.model_extra or {}).get("partitionkey")
        return value if isinstance(value, str) else None

    @property
    def sequence(self) -> int | None:
        """The CloudEvents ``sequence`` extension as a number (checked by :func:`parse_event`)."""
        value = (self.model_extra or {}).get("sequence")
        if isinstance(value, str) and _SEQUENCE.fullmatch(value):
            return int(value)
        return None

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
    partitionkey: str | None = None,
    sequence: int | None = None,
) -> CloudEvent[D]:
    """A new event of ``routing_key`` (``user.created.v1``) with a fresh id and time.

    ``partitionkey`` and ``sequence`` set the CloudEvents extensions of the same names (the
    sequence as a decimal string, 0 to 10**18 - 1).
    """
    extensions: dict[str, str] = {}
    if partitionkey is not None:
        if not 0 < len(partitionkey) <= MAX_ID_LENGTH or _NOT_ALLOWED_IN_STRINGS.search(
            partitionkey
        ):
            raise ValueError(f"a partition key is 1 to {MAX_ID_LENGTH} printable characters")
        extensions["partitionkey"] = partitionkey
    if sequence is not None:
        if type(sequence) is not int or not _SEQUENCE.fullmatch(str(sequence)):
            raise ValueError("a sequence is an integer from 0 to 10**18 - 1")
        extensions["sequence"] = str(sequence)
    return CloudEvent[D](
        **extensions,
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
    """Parse structured-mode bytes; :class:`MalformedEvent` says why they are not a CloudEvent.

    Foreign input: whatever ``body`` holds, this returns an event or raises
    :class:`MalformedEvent`, nothing else. The body must be at most :data:`MAX_BODY_BYTES` of
    UTF-8 JSON (no ``NaN``/``Infinity``, nested at most :data:`MAX_DEPTH` deep), an object with
    a ``data`` object and the CloudEvents 1.0 attributes, string attributes as JSON strings
    without control characters, extensions named ``[a-z0-9]+`` with a string, boolean or 32-bit
    integer value.
    """
    raw = _load(body)
    if not isinstance(raw, dict):
        raise MalformedEvent(f"body is JSON {type(raw).__name__}, not a CloudEvent object")
    if "data" not in raw:
        raise MalformedEvent("CloudEvent has no 'data' attribute")
    if not isinstance(raw["data"], dict):
        raise MalformedEvent("CloudEvent 'data' must be a JSON object")
    for name, value in raw.items():
        if name != "data":
            _check_attribute(name, value)
    try:
        return CloudEvent[dict[str, Any]].model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "envelope"
        raise MalformedEvent(f"not a CloudEvent: {field}: {first['msg']}") from None


def _load(body: bytes | str) -> Any:
    """The JSON value of ``body``, within the size, encoding, number and depth limits."""
    if isinstance(body, str):
        try:
            body = body.encode()
        except UnicodeEncodeError:
            raise MalformedEvent("body is not valid Unicode (lone surrogate)") from None
    if len(body) > MAX_BODY_BYTES:
        raise MalformedEvent(f"body is {len(body)} bytes, more than the {MAX_BODY_BYTES} allowed")
    try:
        text = body.decode()  # RFC 8259: JSON exchanged between systems is UTF-8
    except UnicodeDecodeError as exc:
        raise MalformedEvent(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        raw = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise MalformedEvent(f"body is nested more than {MAX_DEPTH} deep") from None
    except ValueError as exc:  # JSONDecodeError, the int digits limit, the hooks below
        raise MalformedEvent(f"body is not JSON: {str(exc)[:200]}") from None
    # cheap guards first: only a body with enough brackets can be too deep
    if text.count("{") + text.count("[") > MAX_DEPTH and _depth(raw) > MAX_DEPTH:
        raise MalformedEvent(f"body is nested more than {MAX_DEPTH} deep")
    if _SURROGATE_ESCAPE.search(text):  # \ud83d\ude00 is fine, a lone \ud800 is not
        try:
            json.dumps(raw, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise MalformedEvent("body holds a lone surrogate (\\ud800-\\udfff)") from None
    return raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError("a number is too large for a float")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: the value may be deep)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


_STRING_ATTRIBUTES = frozenset(name for name in CloudEvent.model_fields if name != "data")


def _check_attribute(name: str, value: Any) -> None:
    """Type and characters of one top-level attribute (pydantic alone would coerce some)."""
    if name in _STRING_ATTRIBUTES:
        if value is not None and not isinstance(value, str):
            raise MalformedEvent(f"not a CloudEvent: {name}: must be a JSON string")
    elif not _EXTENSION_NAME.fullmatch(name):
        raise MalformedEvent(
            f"not a CloudEvent: extension name {name[:40]!r} is not lower-case a-z and 0-9"
        )
    elif name == "partitionkey" and not (
        isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH
    ):
        raise MalformedEvent(
            f"not a CloudEvent: partitionkey must be a string of 1 to {MAX_ID_LENGTH} characters"
        )
    elif name == "sequence" and not (isinstance(value, str) and _SEQUENCE.fullmatch(value)):
        raise MalformedEvent(
            "not a CloudEvent: sequence must be a decimal string from 0 to 10**18 - 1"
        )
    elif isinstance(value, int) and not isinstance(value, bool) and value not in _INT32:
        raise MalformedEvent(f"not a CloudEvent: {name}: integer out of the 32-bit range")
    elif not isinstance(value, str | int | None):
        raise MalformedEvent(
            f"not a CloudEvent: {name}: an extension is a string, boolean or integer"
        )
    if isinstance(value, str) and _NOT_ALLOWED_IN_STRINGS.search(value):
        raise MalformedEvent(f"not a CloudEvent: {name}: control character or noncharacter")
