"""The event catalog (``contracts/catalog.yaml``) and the JSON Schemas it points to."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

NAMESPACE = "com.tributary"
_ENV_DIR = "TRIBUTARY_CONTRACTS_DIR"
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


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

    @property
    def latest(self) -> VersionSpec:
        return self.versions[max(self.versions)]

    def is_irreversible_for(self, consumer: str) -> bool:
        return consumer in self.irreversible_for


@dataclass(frozen=True)
class Catalog:
    root: Path
    types: dict[str, TypeSpec]

    def __iter__(self) -> Iterator[TypeSpec]:
        return iter(self.types.values())

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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"catalog entry {name!r} is malformed: {exc!r}") from exc
    return Catalog(root=root, types=types)


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
