"""Upcasters for stored domain events, as ``tributary.contracts.upcasting`` is for bus events.

A stored event keeps the schema version it was written with, forever (the store is
append-only). Reading it, the store upcasts its data step by step (v1 → v2 → …) to the
version the code knows; the row itself never changes. A missing step is
:class:`~tributary.contracts.upcasting.NoUpcastPath`, a step that raises is
:class:`~tributary.contracts.upcasting.UpcastFailed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tributary.contracts.upcasting import NoUpcastPath, UpcastFailed

Step = Callable[[dict[str, Any]], dict[str, Any]]


class Upcasters:
    """A registry of ``vN → vN+1`` steps per event type."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Step] = {}

    def register(self, type_name: str, from_version: int) -> Callable[[Step], Step]:
        def add(step: Step) -> Step:
            key = (type_name, from_version)
            if key in self._steps:
                raise ValueError(f"an upcaster for {type_name} v{from_version} is registered")
            self._steps[key] = step
            return step

        return add

    def upcast(
        self, type_name: str, version: int, data: dict[str, Any], to_version: int
    ) -> dict[str, Any]:
        if to_version < version:
            raise NoUpcastPath(f"cannot downcast {type_name} v{version} to v{to_version}")
        for step in range(version, to_version):
            fn = self._steps.get((type_name, step))
            if fn is None:
                raise NoUpcastPath(f"no upcaster from {type_name} v{step} to v{step + 1}")
            try:
                data = fn(dict(data))
            except Exception as exc:
                raise UpcastFailed(
                    f"upcaster {type_name} v{step} to v{step + 1} raised {type(exc).__name__}"
                ) from exc
            if not isinstance(data, dict):
                raise UpcastFailed(f"upcaster {type_name} v{step} returned {type(data).__name__}")
        return data


UPCASTERS = Upcasters()


@UPCASTERS.register("SubscriptionRequested", 1)
def requested_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v1 priced every plan in euros and said so nowhere; v2 names the currency."""
    return {**data, "currency": "EUR"}
