"""Per-entity ordering: partition slots in routing keys, and the bindings that route them.

A type is partitioned when a consumer of it opted in (the catalog's ``partitioning``). Its
producers publish every event with the routing key ``<type>.v<N>.s<slot>``: ``slot`` is the
CRC-32 of the event's partition key (the ``partitionkey`` extension, else its ``subject``,
else its ``id``) modulo the catalog's slot count, so every event of one entity carries the
same slot. No broker plugin is involved: a topic exchange routes the slot word.

A partitioned consumer has ``partitions`` work queues ``<service>.events.p<k>``, each with
single-active-consumer; queue ``k`` binds ``<type>.*.s<slot>`` for each slot with
``slot % partitions == k``. Consumers without partitions bind ``<type>.*`` and ``<type>.*.*``
and see every event as before.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable

from tributary.contracts.catalog import Catalog, CatalogError, TypeSpec, catalog

PARTITION_KEY = "partitionkey"
"""The CloudEvents partitioning extension: the entity the event is about."""
SEQUENCE = "sequence"
"""The CloudEvents sequence extension: the event's position among its entity's events."""


def slot_of(key: str, slots: int) -> int:
    """The slot of ``key``: CRC-32 of its UTF-8 bytes modulo ``slots`` (stable everywhere)."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % slots


def slotted(routing_key: str, slot: int) -> str:
    """``user.created.v2`` in slot 7 → ``user.created.v2.s7``."""
    return f"{routing_key}.s{slot}"


def key_of(attributes: object) -> str:
    """An event's partition key from its attributes (a parsed envelope): ``partitionkey``,
    else ``subject``, else ``id``; ``""`` if none is a string."""
    if isinstance(attributes, dict):
        for name in (PARTITION_KEY, "subject", "id"):
            value = attributes.get(name)
            if isinstance(value, str) and value:
                return value
    return ""


def wire_routing_key(routing_key: str, body: bytes, cat: Catalog | None = None) -> str:
    """The routing key to publish an event of ``routing_key`` (``<type>.v<N>``) with: slotted
    when its type is partitioned, else as it is. ``body`` is the event (structured mode)."""
    cat = cat or catalog()
    try:
        spec = cat.by_routing_key(routing_key)
    except CatalogError:
        return routing_key  # not ours to route: the broker decides (unroutable, or refused)
    slots = cat.type(spec.type).slots
    if not slots:
        return routing_key
    try:
        attributes = json.loads(body)
    except (ValueError, RecursionError):
        attributes = None
    return slotted(routing_key, slot_of(key_of(attributes), slots))


def binding_keys(specs: Iterable[TypeSpec]) -> list[str]:
    """Binding keys of an unpartitioned work queue for ``specs``: every version, slotted or not."""
    keys: list[str] = []
    for spec in specs:
        keys.append(f"{spec.name}.*")
        if spec.partitioned:
            keys.append(f"{spec.name}.*.*")
    return keys


def partition_binding_keys(
    specs: Iterable[TypeSpec], *, slots: int, partitions: int, partition: int
) -> list[str]:
    """Binding keys of partition queue ``partition`` of ``partitions``: its slots of ``specs``."""
    mine = [slot for slot in range(slots) if slot % partitions == partition]
    return [f"{spec.name}.*.s{slot}" for spec in specs for slot in mine]
