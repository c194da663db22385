"""Upcasters: functions that turn a payload of version N into version N+1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class NoUpcastPath(LookupError):
    """No chain of upcasters leads from the event's version to the wanted one."""


class UpcastFailed(ValueError):
    """An upcaster exists but raised on this payload (a bug or data it did not expect)."""


def upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register the decorated function as the ``from_version → from_version + 1`` step."""

    def register(fn: Upcaster) -> Upcaster:
        key = (type_name, from_version)
        if key in _UPCASTERS:
            raise ValueError(f"an upcaster for {type_name} v{from_version} is already registered")
        _UPCASTERS[key] = fn
        return fn

    return register


def has_upcaster(type_name: str, from_version: int) -> bool:
    return (type_name, from_version) in _UPCASTERS


def upcast(type_name: str, version: int, data: dict[str, Any], to_version: int) -> dict[str, Any]:
    """Apply the registered steps from ``version`` up to ``to_version``."""
    if to_version < version:
        raise NoUpcastPath(f"cannot downcast {type_name} v{version} to v{to_version}")
    for step in range(version, to_version):
        fn = _UPCASTERS.get((type_name, step))
        if fn is None:
            raise NoUpcastPath(f"no upcaster from {type_name} v{step} to v{step + 1}")
        try:
            data = fn(data)
        except Exception as exc:
            raise UpcastFailed(
                f"upcaster {type_name} v{step} to v{step + 1} raised {type(exc).__name__}"
            ) from exc
        if not isinstance(data, dict):  # the next step, or the payload model, needs an object
            raise UpcastFailed(
                f"upcaster {type_name} v{step} to v{step + 1} returned {type(data).__name__}"
            )
    return data


@upcaster("user.created", 1)
def user_created_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Split ``name`` at the first whitespace into ``given_name`` and ``family_name``."""
    out = {k: v for k, v in data.items() if k != "name"}
    name = str(data["name"])
    parts = name.split(None, 1)
    out["given_name"] = parts[0] if parts else name
    out["family_name"] = parts[1].strip() if len(parts) > 1 else ""
    return out
