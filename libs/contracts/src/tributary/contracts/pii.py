"""PII masking driven by the schemas' ``x-pii`` marks: the one path logs, audit and traces use."""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Literal

from tributary.contracts.catalog import CatalogError, catalog

Style = Literal["mask", "hash"]
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


def mask_value(value: Any) -> Any:
    """``ada@example.com`` → ``a***@example.com``; other text → first letter + ``***``.

    A masked value never contains the value itself: an address loses its local part but its
    first letter, and a text of one character, which its first letter would show whole, keeps
    nothing (``***``).
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {k: mask_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_value(v) for v in value]
    text = str(value)
    local, at, domain = text.partition("@")
    if at and local:
        return f"{local[0]}***@{domain}"
    if len(text) == 1:
        return "***"
    return f"{text[0]}***" if text else ""


def hash_value(value: Any, key: bytes) -> str:
    """A keyed hash (HMAC-SHA256, 16 hex digits): equal inputs stay equal, nothing is readable."""
    digest = hmac.new(key, str(value).encode(), hashlib.sha256).hexdigest()
    return f"hmac:{digest[:16]}"


def _pii_paths(schema: dict[str, Any]) -> dict[str, Any]:
    """``{field: True}`` for PII fields, ``{field: {...}}`` for objects containing some."""
    marks: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        if prop.get("x-pii"):
            marks[name] = True
        elif prop.get("type") == "object" and (inner := _pii_paths(prop)):
            marks[name] = inner
    return marks


def _apply(data: dict[str, Any], marks: dict[str, Any], style: Style, key: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        mark = marks.get(name)
        if mark is True:
            out[name] = mask_value(value) if style == "mask" else hash_value(value, key)
        elif isinstance(mark, dict) and isinstance(value, dict):
            out[name] = _apply(value, mark, style, key)
        else:
            out[name] = value
    return out


def mask_payload(
    routing_key: str, data: dict[str, Any], *, style: Style = "mask", key: bytes = b""
) -> dict[str, Any]:
    """A copy of ``data`` with every ``x-pii`` field masked; unknown types mask every value."""
    try:
        schema = catalog().by_routing_key(routing_key).schema
    except CatalogError:
        return {k: mask_value(v) for k, v in data.items()}
    return _apply(data, _pii_paths(schema), style, key)


def scrub_text(text: str) -> str:
    """Mask anything that looks like an email address in free text (error messages, logs)."""
    return _EMAIL.sub(lambda m: str(mask_value(m.group(0))), text)
