"""The event catalog (``contracts/catalog.yaml``) and the JSON Schemas it points to."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

NAMESPACE = "com.tributary"
_ENV_DIR = "TRIBUTARY_CONTRACTS_DIR"
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
_PRODUCER_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
EXTERNAL = "external"
"""The ``owner`` of a type produced outside this repo; its ``producers`` name who."""
RUNTIME = "runtime"
"""The ``owner`` of an event the messaging runtime of every service produces (about the
runtime itself, such as ``message.dead_lettered``): every service of the catalog is a producer."""


class CatalogError(Exception):
    """The catalog or a schema it names is missing or inconsistent."""


@dataclass(frozen=True)
class VersionSpec:
    type: str
    version: int
    schema_path: Path
    status: Literal["active", "deprecated"]
    deprecated_since: str | None
    pii: tuple[str, ...]

    @property
    def routing_key(self) -> str:
        """``user.created.v1``: the AMQP routing key of this version."""
        return f"{self.type}.v{self.version}"

    @property
    def ce_type(self) -> str:
        """``com.tributary.user.created.v1``: the CloudEvents ``type`` attribute."""
        return f"{NAMESPACE}.{self.routing_key}"

    @property
    def schema(self) -> dict[str, Any]:
        return _load_json(self.schema_path)


@dataclass(frozen=True)
class TypeSpec:
    name: str
    kind: Literal["event", "command"]
    owner: str
    description: str
    consumers: tuple[str, ...]
    irreversible_for: tuple[str, ...]
    versions: dict[int, VersionSpec] = field(default_factory=dict)
    producers: tuple[str, ...] = ()
    """Who may publish it: the owning service, the foreign producers of an ``external`` type,
    every service for a ``runtime`` type, or a command's ``senders``."""
    slots: int = 0
    """Partition slots of its routing keys (``<type>.v<N>.s<slot>``), 0 when unpartitioned: a
    type is partitioned when one of its consumers has partition queues (see
    :class:`Partitioning`)."""

    @property
    def partitioned(self) -> bool:
        return self.slots > 0

    @property
    def latest(self) -> VersionSpec:
        return self.versions[max(self.versions)]

    def is_irreversible_for(self, consumer: str) -> bool:
        return consumer in self.irreversible_for


@dataclass(frozen=True)
class Partitioning:
    """Per-entity ordering (the catalog's ``partitioning``): ``services`` maps each consumer
    that opted in to its number of partition queues ``<service>.events.p<k>``.

    Producers route every event of a type such a service consumes with the routing key
    ``<type>.v<N>.s<slot>``, ``slot`` a stable hash of the event's partition key modulo
    ``slots``; partition queue ``k`` binds the slots with ``slot % partitions == k``.
    """

    slots: int = 0
    services: dict[str, int] = field(default_factory=dict)

    def partitions(self, service: str) -> int:
        """Partition queues of ``service``; 0 when it has one work queue."""
        return self.services.get(service, 0)


@dataclass(frozen=True)
class Catalog:
    root: Path
    types: dict[str, TypeSpec]
    external_producers: dict[str, str] = field(default_factory=dict)
    """Producers outside this repo (name → description); each may publish only its types."""
    partitioning: Partitioning = field(default_factory=Partitioning)

    def __iter__(self) -> Iterator[TypeSpec]:
        return iter(self.types.values())

    @property
    def services(self) -> tuple[str, ...]:
        """Every service of this repo the catalog names (as owner or consumer), sorted."""
        return _services(self.types.values())

    def published_by(self, producer: str) -> tuple[TypeSpec, ...]:
        """The types ``producer`` (a service or a foreign producer) may publish or send."""
        return tuple(spec for spec in self if producer in spec.producers)

    def consumed_by(self, service: str) -> tuple[TypeSpec, ...]:
        """The types ``service`` subscribes to (events) or handles (commands)."""
        return tuple(spec for spec in self if service in spec.consumers)

    def versions(self) -> Iterator[VersionSpec]:
        for spec in self.types.values():
            yield from spec.versions.values()

    def type(self, name: str) -> TypeSpec:
        try:
            return self.types[name]
        except (KeyError, TypeError):  # TypeError: not even hashable
            raise CatalogError(f"unknown event type {repr(name)[:200]}") from None

    def by_routing_key(self, routing_key: str) -> VersionSpec:
        """``user.created.v2`` → its spec; :class:`CatalogError` for anything else."""
        if not isinstance(routing_key, str):
            raise CatalogError(f"a routing key is a string, not {type(routing_key).__name__}")
        name, _, version = routing_key.rpartition(".v")
        # ASCII digits only, no leading zero: "v²" and "v٢" pass str.isdigit() but are no version
        if not name or not _VERSION.fullmatch(version):
            raise CatalogError(f"not a versioned routing key: {routing_key[:200]!r}")
        spec = self.type(name)
        try:
            return spec.versions[int(version)]
        except KeyError:
            raise CatalogError(f"unknown version {version} of {name!r}") from None

    def by_ce_type(self, ce_type: str) -> VersionSpec:
        """``com.tributary.user.created.v2`` → its spec; :class:`CatalogError` for anything else."""
        prefix = NAMESPACE + "."
        if not isinstance(ce_type, str) or not ce_type.startswith(prefix):
            raise CatalogError(f"type {repr(ce_type)[:200]} is not in the {NAMESPACE} namespace")
        return self.by_routing_key(ce_type[len(prefix) :])


def contracts_dir() -> Path:
    """Where ``catalog.yaml`` lives: $TRIBUTARY_CONTRACTS_DIR, the packaged copy, or the repo."""
    if env := os.environ.get(_ENV_DIR):
        return Path(env)
    packaged = Path(__file__).parent / "_data"
    if (packaged / "catalog.yaml").is_file():
        return packaged
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "contracts"
        if (candidate / "catalog.yaml").is_file():
            return candidate
    raise CatalogError(f"contracts/catalog.yaml not found; set {_ENV_DIR}")


def parse_catalog(root: Path, raw: dict[str, Any]) -> Catalog:
    """Build a catalog from the parsed YAML of ``catalog.yaml`` found in ``root``."""
    if raw.get("namespace") != NAMESPACE:
        raise CatalogError(f"catalog namespace must be {NAMESPACE!r}")
    external = _external_producers(raw.get("external_producers"))
    types: dict[str, TypeSpec] = {}
    for name, entry in (raw.get("types") or {}).items():
        try:
            versions = {
                int(v["version"]): VersionSpec(
                    type=name,
                    version=int(v["version"]),
                    schema_path=root / v["schema"],
                    status=v["status"],
                    deprecated_since=v.get("deprecated_since"),
                    pii=tuple(v.get("pii") or ()),
                )
                for v in entry["versions"]
            }
            types[name] = TypeSpec(
                name=name,
                kind=entry["kind"],
                owner=entry["owner"],
                description=entry.get("description", ""),
                consumers=tuple(entry.get("consumers") or ()),
                irreversible_for=tuple(entry.get("irreversible_for") or ()),
                versions=versions,
                producers=_names(entry, "producers") + _names(entry, "senders"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"catalog entry {name!r} is malformed: {exc!r}") from exc
    services = set(_services(types.values()))
    if reserved := sorted(
        {c for spec in types.values() for c in spec.consumers} & {EXTERNAL, RUNTIME}
    ):
        raise CatalogError(f"{reserved} name no service: they cannot consume")
    if clash := sorted(services & external.keys()):
        raise CatalogError(f"external producer(s) {clash} have the name of a service")
    for name, spec in types.items():
        types[name] = _with_producers(
            spec, types_raw=raw["types"][name], external=external, services=services
        )
    if idle := sorted(external.keys() - {p for spec in types.values() for p in spec.producers}):
        raise CatalogError(f"external producer(s) {idle} may publish no type; remove them")
    partitioning = _partitioning(raw.get("partitioning"), services)
    for name, spec in types.items():
        # commands keep their own queue: only events reach a service's partition queues
        if spec.kind == "event" and any(partitioning.partitions(c) for c in spec.consumers):
            types[name] = _partitioned(spec, partitioning.slots, types)
    return Catalog(root=root, types=types, external_producers=external, partitioning=partitioning)


MAX_SLOTS = 1024
"""Most partition slots: every partition queue binds its slots one by one."""


def _partitioning(raw: object, services: set[str]) -> Partitioning:
    """``partitioning: {slots: 32, services: {audit: 4}}``, checked."""
    if raw is None:
        return Partitioning()
    if not isinstance(raw, dict) or set(raw) - {"slots", "services"}:
        raise CatalogError("partitioning has 'slots' and 'services' (service: partitions)")
    slots, opted = raw.get("slots"), raw.get("services") or {}
    if type(slots) is not int or not 1 <= slots <= MAX_SLOTS:
        raise CatalogError(f"partitioning.slots must be an integer from 1 to {MAX_SLOTS}")
    if not isinstance(opted, dict):
        raise CatalogError("partitioning.services maps each service to its partition count")
    for service, count in opted.items():
        if service not in services:
            raise CatalogError(f"partitioning: {str(service)[:100]!r} is no service of the catalog")
        if type(count) is not int or not 1 <= count <= slots:
            raise CatalogError(
                f"partitioning: {service!r} needs 1 to {slots} partitions (one per slot at most)"
            )
    return Partitioning(slots=slots, services=dict(opted))


def _partitioned(spec: TypeSpec, slots: int, types: dict[str, TypeSpec]) -> TypeSpec:
    """``spec`` with its slots; refused where a producer could not route by slot."""
    where = f"catalog entry {spec.name!r}"
    if spec.owner == EXTERNAL:
        raise CatalogError(
            f"{where}: its producers are outside this repo and do not add partition slots; "
            "a service consuming it cannot be partitioned"
        )
    # "<type>.*.*" binds the slotted keys of unpartitioned consumers: no other type may match
    if clash := sorted(other for other in types if other.startswith(f"{spec.name}.")):
        raise CatalogError(f"{where}: type(s) {clash} extend its name; rename them to partition it")
    return replace(spec, slots=slots)


def _services(specs: Iterable[TypeSpec]) -> tuple[str, ...]:
    named = {spec.owner for spec in specs} | {c for spec in specs for c in spec.consumers}
    return tuple(sorted(named - {EXTERNAL, RUNTIME}))


def _names(entry: dict[str, Any], key: str) -> tuple[str, ...]:
    value = entry.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of names")
    return tuple(value)


def _external_producers(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CatalogError("external_producers must map each name to a description")
    for name, description in raw.items():
        if (
            not isinstance(name, str)
            or not _PRODUCER_NAME.fullmatch(name)
            or name in (EXTERNAL, RUNTIME)
        ):
            raise CatalogError(
                f"external producer name {str(name)[:100]!r} must match {_PRODUCER_NAME.pattern}"
            )
        if not isinstance(description, str):
            raise CatalogError(f"external producer {name!r}: the description must be text")
    return dict(raw)


def _with_producers(
    spec: TypeSpec, *, types_raw: dict[str, Any], external: dict[str, str], services: set[str]
) -> TypeSpec:
    """``spec`` with its producers checked and, for a service-owned event, set to the owner.

    A catalog from before producers were recorded (an old revision ``eventctl contracts check``
    compares with) parses too: a command without ``senders`` is sent by its owner, an external
    event without ``producers`` by nobody.
    """
    where = f"catalog entry {spec.name!r}"
    if spec.owner == RUNTIME:
        if spec.kind != "event" or "producers" in types_raw or "senders" in types_raw:
            raise CatalogError(
                f"{where}: owner {RUNTIME!r} is for events every service produces; it lists "
                "no producers or senders"
            )
        producers, known, what = tuple(sorted(services)), services, "producer"
    elif spec.kind == "command":
        if "producers" in types_raw:
            raise CatalogError(f"{where}: a command names its senders, not producers")
        producers = spec.producers if "senders" in types_raw else (spec.owner,)
        known = services | external.keys()
        what = "sender"
    elif spec.owner == EXTERNAL:
        if "senders" in types_raw:
            raise CatalogError(f"{where}: only commands have senders")
        producers, known, what = spec.producers, set(external), "producer"
    else:
        if "producers" in types_raw or "senders" in types_raw:
            raise CatalogError(
                f"{where}: its owner {spec.owner!r} is its producer; producers are listed only "
                f"for owner {EXTERNAL!r}"
            )
        producers, known, what = (spec.owner,), services, "producer"
    for producer in producers:
        if producer not in known:
            hint = " (declare it under external_producers)" if what == "producer" else ""
            raise CatalogError(f"{where}: unknown {what} {producer[:100]!r}{hint}")
    if len(set(producers)) != len(producers):
        raise CatalogError(f"{where}: a {what} is listed twice")
    return replace(spec, producers=tuple(producers))


def load_catalog(root: Path | None = None) -> Catalog:
    """Read and parse the catalog; ``root`` defaults to :func:`contracts_dir`."""
    root = root or contracts_dir()
    with (root / "catalog.yaml").open(encoding="utf-8") as fh:
        return parse_catalog(root, yaml.safe_load(fh))


@cache
def catalog() -> Catalog:
    """The process-wide catalog (read once)."""
    return load_catalog()


@cache
def _load_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            data: dict[str, Any] = json.load(fh)
    except FileNotFoundError:
        raise CatalogError(f"schema file {path} is missing") from None
    return data
