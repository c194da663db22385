"""Compatibility checks between two revisions of the event contracts.

The rule of thumb: every payload that was valid under the old schema must still be valid
under the new one (events already on the bus, in DLQs and in the audit store are replayed
against the new schema), and every field a consumer could rely on must still be there.
Loosening a schema is fine; tightening it, removing a field or making a required field
optional is not. A breaking change needs a new major version with an upcaster.

Rule ids (one per kind of breaking change):

``property_removed``                a property disappeared from ``properties``
``type_changed``                    ``type`` changed or was narrowed (widening is fine)
``made_required``                   a property (new or existing) became required
``made_optional``                   a required property became optional
``enum_narrowed``                   an enum value was removed, or an enum was added
``const_changed``                   ``const`` was added or changed
``format_tightened``                ``format`` was added or changed
``pattern_tightened``               ``pattern`` was added or changed
``bound_tightened``                 an upper bound added/lowered, a lower bound added/raised,
                                    ``multipleOf`` added/changed, ``uniqueItems`` switched on
``additional_properties_tightened`` ``additionalProperties`` closed or constrained
``keyword_changed``                 another validation keyword (``anyOf``, ``not``, ...)
                                    changed in a way this checker cannot prove compatible
``schema_deleted``                  an active version's schema disappeared
``new_version_without_migration``   version N+1 added without an upcaster from N and
                                    without deprecating N

One rule is not a break but a change someone must review (``severity`` ``review``): who may
publish a type decides the broker's permissions.

``producers_changed``               a type's producers (its owner, the foreign producers of an
                                    external type, a command's senders) changed; a ``runtime``
                                    event (every service produces it) only when its owner does
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tributary.contracts.catalog import RUNTIME, Catalog, VersionSpec, load_catalog

PROPERTY_REMOVED = "property_removed"
TYPE_CHANGED = "type_changed"
MADE_REQUIRED = "made_required"
MADE_OPTIONAL = "made_optional"
ENUM_NARROWED = "enum_narrowed"
CONST_CHANGED = "const_changed"
FORMAT_TIGHTENED = "format_tightened"
PATTERN_TIGHTENED = "pattern_tightened"
BOUND_TIGHTENED = "bound_tightened"
ADDITIONAL_PROPERTIES_TIGHTENED = "additional_properties_tightened"
KEYWORD_CHANGED = "keyword_changed"
SCHEMA_DELETED = "schema_deleted"
NEW_VERSION_WITHOUT_MIGRATION = "new_version_without_migration"
PRODUCERS_CHANGED = "producers_changed"

RULES: tuple[str, ...] = (
    PROPERTY_REMOVED,
    TYPE_CHANGED,
    MADE_REQUIRED,
    MADE_OPTIONAL,
    ENUM_NARROWED,
    CONST_CHANGED,
    FORMAT_TIGHTENED,
    PATTERN_TIGHTENED,
    BOUND_TIGHTENED,
    ADDITIONAL_PROPERTIES_TIGHTENED,
    KEYWORD_CHANGED,
    SCHEMA_DELETED,
    NEW_VERSION_WITHOUT_MIGRATION,
)
"""Rules of breaking changes."""
REVIEW_RULES: frozenset[str] = frozenset({PRODUCERS_CHANGED})
"""Rules that flag a change for review rather than a break."""

UpcasterExists = Callable[[str, int], bool]


@dataclass(frozen=True)
class Incompatibility:
    """One breaking change, e.g. ``user.created v1: data.email: property removed``."""

    type_name: str
    version: int
    path: str
    rule: str
    message: str

    def __str__(self) -> str:
        if self.version == 0:  # about the type, not one version of it
            return f"{self.type_name}: {self.path}: {self.message} ({self.rule})"
        return f"{self.type_name} v{self.version}: {self.path}: {self.message} ({self.rule})"

    @property
    def needs_review(self) -> bool:
        """A change to review (who may publish), not a compatibility break."""
        return self.rule in REVIEW_RULES


class GitError(RuntimeError):
    """A git command failed (unknown ref, not a repository, ...)."""


# --------------------------------------------------------------------------- schemas

# Keywords that only document a schema; editing them never breaks anyone.
_ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$anchor",
        "$comment",
        "$defs",
        "definitions",
        "title",
        "description",
        "examples",
        "default",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentMediaType",
        "contentEncoding",
        "contentSchema",
    }
)
# Upper bounds: adding one or lowering it tightens the schema.
_UPPER_BOUNDS = (
    "maxLength",
    "maxItems",
    "maxProperties",
    "maxContains",
    "maximum",
    "exclusiveMaximum",
)
# Lower bounds: adding one or raising it tightens the schema.
_LOWER_BOUNDS = (
    "minLength",
    "minItems",
    "minProperties",
    "minContains",
    "minimum",
    "exclusiveMinimum",
)
# Keywords compared by a dedicated rule below; everything else non-annotation falls back
# to ``keyword_changed``.
_HANDLED = frozenset(
    {
        "$ref",
        "type",
        "enum",
        "const",
        "format",
        "pattern",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "multipleOf",
        "uniqueItems",
        "anyOf",
        "oneOf",
        "allOf",
        *_UPPER_BOUNDS,
        *_LOWER_BOUNDS,
    }
)
# Keywords whose mere removal can tighten a schema (with ``additionalProperties: false``,
# a dropped ``patternProperties`` entry rejects keys that used to be fine).
_REMOVAL_TIGHTENS = frozenset({"patternProperties"})


def _is_annotation(key: str) -> bool:
    return key in _ANNOTATIONS or key.startswith("x-")


def _strip_annotations(value: Any) -> Any:
    """``value`` without annotations at any depth, for equality checks of subschemas."""
    if isinstance(value, dict):
        return {k: _strip_annotations(v) for k, v in value.items() if not _is_annotation(k)}
    if isinstance(value, list):
        return [_strip_annotations(v) for v in value]
    return value


def _canonical(value: Any) -> str:
    return json.dumps(_strip_annotations(value), sort_keys=True, separators=(",", ":"))


def _literal(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _types(schema: dict[str, Any]) -> set[str] | None:
    raw = schema.get("type")
    if raw is None:
        return None
    return {raw} if isinstance(raw, str) else {str(t) for t in raw}


def _allowed_values(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The values ``const``/``enum`` permit (canonical JSON → value); None = unrestricted."""
    allowed: dict[str, Any] | None = None
    if "enum" in schema:
        allowed = {_literal(v): v for v in schema["enum"]}
    if "const" in schema:
        key = _literal(schema["const"])
        allowed = {key: schema["const"]} if allowed is None or key in allowed else {}
    return allowed


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class _Ctx:
    type_name: str
    version: int
    old_root: Any
    new_root: Any
    findings: list[Incompatibility] = field(default_factory=list)
    open_refs: set[tuple[str, str]] = field(default_factory=set)

    def add(self, path: str, rule: str, message: str) -> None:
        self.findings.append(Incompatibility(self.type_name, self.version, path, rule, message))


def _resolve(root: Any, node: dict[str, Any]) -> dict[str, Any]:
    """Inline a local ``$ref`` (``#/$defs/...``); sibling keywords win over the target."""
    ref = node.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#"):
        return node
    target: Any = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return node  # dangling: leave the $ref alone, it is compared as a string
    if target is True:
        target = {}
    if not isinstance(target, dict):
        return node
    merged = dict(target)
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def _compare(old: Any, new: Any, path: str, ctx: _Ctx) -> None:
    # Boolean schemas: true accepts everything (same as {}), false accepts nothing.
    if old is False:
        return
    if new is False:
        ctx.add(path, TYPE_CHANGED, "schema now rejects every value")
        return
    old = {} if old is True else old
    new = {} if new is True else new
    if not isinstance(old, dict) or not isinstance(new, dict):
        return

    old_ref, new_ref = old.get("$ref"), new.get("$ref")
    if not isinstance(old_ref, str) and not isinstance(new_ref, str):
        _compare_node(old, new, path, ctx)
        return
    key = (str(old_ref), str(new_ref))
    if key in ctx.open_refs:  # recursive schema: this pair is already compared further up
        return
    ctx.open_refs.add(key)
    try:
        old = _resolve(ctx.old_root, old)
        new = _resolve(ctx.new_root, new)
        if "$ref" in new and new.get("$ref") != old.get("$ref"):
            ctx.add(path, KEYWORD_CHANGED, f"$ref changed to {new['$ref']!r}")
            return
        _compare_node(old, new, path, ctx)
    finally:
        ctx.open_refs.discard(key)


def _compare_node(old: dict[str, Any], new: dict[str, Any], path: str, ctx: _Ctx) -> None:
    if _compare_type(old, new, path, ctx):
        return  # a different kind of value altogether: nested findings would only be noise
    _compare_values(old, new, path, ctx)
    _compare_keyword(old, new, "format", FORMAT_TIGHTENED, path, ctx)
    _compare_keyword(old, new, "pattern", PATTERN_TIGHTENED, path, ctx)
    _compare_bounds(old, new, path, ctx)
    _compare_object(old, new, path, ctx)
    _compare_array(old, new, path, ctx)
    _compare_combinators(old, new, path, ctx)
    _compare_other(old, new, path, ctx)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _compare_type(old: dict[str, Any], new: dict[str, Any], path: str, ctx: _Ctx) -> bool:
    old_types, new_types = _types(old), _types(new)
    if new_types is None:
        return False  # type constraint dropped: loosening
    if old_types is None and (allowed := _allowed_values(old)) is not None:
        old_types = {_json_type(v) for v in allowed.values()}  # {"const": "web"}: a string
    if old_types is None:
        ctx.add(path, TYPE_CHANGED, f"type restricted to {sorted(new_types)}")
        return True
    lost = {t for t in old_types if t not in new_types}
    if "integer" in lost and "number" in new_types:
        lost.discard("integer")  # every integer is a number
    if not lost:
        return False
    if new_types < old_types:
        ctx.add(
            path, TYPE_CHANGED, f"type narrowed from {sorted(old_types)} to {sorted(new_types)}"
        )
    else:
        ctx.add(path, TYPE_CHANGED, f"type changed from {sorted(old_types)} to {sorted(new_types)}")
    return True


def _compare_values(old: dict[str, Any], new: dict[str, Any], path: str, ctx: _Ctx) -> None:
    old_allowed, new_allowed = _allowed_values(old), _allowed_values(new)
    if new_allowed is None:
        return
    rule = CONST_CHANGED if "const" in new else ENUM_NARROWED
    if old_allowed is None:
        what = f"const {_literal(new['const'])}" if "const" in new else "enum"
        ctx.add(path, rule, f"{what} added where any value was allowed")
        return
    removed = [v for k, v in old_allowed.items() if k not in new_allowed]
    if not removed:
        return
    if rule == CONST_CHANGED:
        old_desc = _literal(old["const"]) if "const" in old else "enum"
        ctx.add(path, rule, f"const changed from {old_desc} to {_literal(new['const'])}")
    else:
        ctx.add(path, rule, f"enum value(s) removed: {', '.join(_literal(v) for v in removed)}")


def _compare_keyword(
    old: dict[str, Any], new: dict[str, Any], key: str, rule: str, path: str, ctx: _Ctx
) -> None:
    if key not in new or old.get(key) == new[key]:
        return
    if key in old:
        ctx.add(path, rule, f"{key} changed from {old[key]!r} to {new[key]!r}")
    else:
        ctx.add(path, rule, f"{key} {new[key]!r} added")


def _compare_bounds(old: dict[str, Any], new: dict[str, Any], path: str, ctx: _Ctx) -> None:
    for key, upper in [(k, True) for k in _UPPER_BOUNDS] + [(k, False) for k in _LOWER_BOUNDS]:
        if key not in new or not _is_number(new[key]):
            continue
        if key not in old or not _is_number(old[key]):
            ctx.add(path, BOUND_TIGHTENED, f"{key} {new[key]} added")
        elif (new[key] < old[key]) if upper else (new[key] > old[key]):
            verb = "lowered" if upper else "raised"
            ctx.add(path, BOUND_TIGHTENED, f"{key} {verb} from {old[key]} to {new[key]}")
    if "multipleOf" in new and _is_number(new["multipleOf"]):
        step = new["multipleOf"]
        before = old.get("multipleOf")
        if not _is_number(before):
            ctx.add(path, BOUND_TIGHTENED, f"multipleOf {step} added")
        elif before != step and (step == 0 or abs(before / step - round(before / step)) > 1e-9):
            ctx.add(path, BOUND_TIGHTENED, f"multipleOf changed from {before} to {step}")
    if new.get("uniqueItems") is True and old.get("uniqueItems") is not True:
        ctx.add(path, BOUND_TIGHTENED, "uniqueItems switched on")


def _ap_state(value: Any) -> str | dict[str, Any]:
    """``additionalProperties`` as "open", "closed" or a (non-trivial) schema."""
    if value is None or value is True or value == {}:
        return "open"
    if value is False:
        return "closed"
    return value if isinstance(value, dict) else "open"


def _compare_object(old: dict[str, Any], new: dict[str, Any], path: str, ctx: _Ctx) -> None:
    old_props: dict[str, Any] = old.get("properties") or {}
    new_props: dict[str, Any] = new.get("properties") or {}
    old_required = set(old.get("required") or ())
    new_required = set(new.get("required") or ())
    old_ap, new_ap = (
        _ap_state(old.get("additionalProperties")),
        _ap_state(new.get("additionalProperties")),
    )

    for name, old_sub in old_props.items():
        if name not in new_props:
            ctx.add(f"{path}.{name}", PROPERTY_REMOVED, "property removed")
        else:
            _compare(old_sub, new_props[name], f"{path}.{name}", ctx)
    if isinstance(old_ap, dict):
        # A newly declared property used to be governed by the old additionalProperties.
        for name in new_props.keys() - old_props.keys():
            _compare(old_ap, new_props[name], f"{path}.{name}", ctx)

    for name in sorted(new_required - old_required):
        if name in old_props or name in new_props:
            what = "existing property" if name in old_props else "new property"
        else:
            what = "property"
        ctx.add(f"{path}.{name}", MADE_REQUIRED, f"{what} is now required")
    for name in sorted(old_required - new_required):
        if name in old_props and name not in new_props:
            continue  # already reported as property_removed
        ctx.add(f"{path}.{name}", MADE_OPTIONAL, "required property is now optional")

    if old_ap == "closed" or new_ap == "open":
        return
    if old_ap == "open":
        what = "false" if new_ap == "closed" else "a schema"
        ctx.add(path, ADDITIONAL_PROPERTIES_TIGHTENED, f"additionalProperties set to {what}")
    elif new_ap == "closed":
        ctx.add(path, ADDITIONAL_PROPERTIES_TIGHTENED, "additionalProperties set to false")
    elif isinstance(old_ap, dict):
        _compare(old_ap, new_ap, f"{path}.*", ctx)


def _compare_array(old: dict[str, Any], new: dict[str, Any], path: str, ctx: _Ctx) -> None:
    old_prefix: list[Any] = old.get("prefixItems") or []
    new_prefix: list[Any] = new.get("prefixItems") or []
    old_items = old.get("items", True)
    for index, new_sub in enumerate(new_prefix):
        old_sub = old_prefix[index] if index < len(old_prefix) else old_items
        _compare(old_sub, new_sub, f"{path}[{index}]", ctx)
    if "items" in new:
        _compare(old_items, new["items"], f"{path}[]", ctx)
        # Positions that used to fall under a longer prefixItems now fall under items.
        for index in range(len(new_prefix), len(old_prefix)):
            _compare(old_prefix[index], new["items"], f"{path}[{index}]", ctx)


def _compare_combinators(old: dict[str, Any], new: dict[str, Any], path: str, ctx: _Ctx) -> None:
    for key in ("anyOf", "oneOf"):
        if key not in new:
            continue
        if key not in old:
            ctx.add(path, KEYWORD_CHANGED, f"{key} added")
            continue
        # Adding alternatives widens; every old alternative must survive unchanged.
        new_branches = {_canonical(b) for b in new[key]}
        if any(_canonical(b) not in new_branches for b in old[key]):
            ctx.add(path, KEYWORD_CHANGED, f"{key} alternatives changed or removed")
    if "allOf" in new:
        # Dropping conjuncts loosens; every new conjunct must already have been there.
        old_branches = {_canonical(b) for b in old.get("allOf") or []}
        if any(_canonical(b) not in old_branches for b in new["allOf"]):
            ctx.add(path, KEYWORD_CHANGED, "allOf gained or changed a subschema")


def _compare_other(old: dict[str, Any], new: dict[str, Any], path: str, ctx: _Ctx) -> None:
    for key in sorted((old.keys() | new.keys()) - _HANDLED):
        if _is_annotation(key):
            continue
        if key not in new:
            if key in _REMOVAL_TIGHTENS:
                ctx.add(path, KEYWORD_CHANGED, f"{key} removed")
            continue
        if key not in old:
            ctx.add(path, KEYWORD_CHANGED, f"{key} added")
        elif _canonical(old[key]) != _canonical(new[key]):
            ctx.add(path, KEYWORD_CHANGED, f"{key} changed")


def compare_schemas(
    old: dict[str, Any],
    new: dict[str, Any],
    *,
    where: str,
    type_name: str = "",
    version: int = 0,
) -> list[Incompatibility]:
    """Breaking changes from ``old`` to ``new``; ``where`` names the schema's root (``data``).

    Field paths are dotted below ``where`` (``data.address.city``); array elements are
    ``[]`` (``data.tags[]``), the values of ``additionalProperties`` are ``*``.
    """
    ctx = _Ctx(type_name=type_name, version=version, old_root=old, new_root=new)
    _compare(old, new, where, ctx)
    return ctx.findings


# --------------------------------------------------------------------------- catalogs


def _read_schema(path: Path) -> dict[str, Any]:
    # Not VersionSpec.schema: that one is cached per path, and a path is reused when the
    # same tree is checked twice in one process.
    with path.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def _pairs(old: Catalog, new: Catalog) -> Iterator[tuple[VersionSpec, VersionSpec | None]]:
    for old_type in old:
        new_type = new.types.get(old_type.name)
        for number in sorted(old_type.versions):
            yield old_type.versions[number], (new_type.versions.get(number) if new_type else None)


def compared_versions(old_root: Path | None, new_root: Path) -> list[tuple[str, int]]:
    """The (type, version) pairs whose schemas exist on both sides and get compared."""
    if old_root is None:
        return []
    old, new = load_catalog(old_root), load_catalog(new_root)
    return [
        (o.type, o.version)
        for o, n in _pairs(old, new)
        if n is not None and o.schema_path.is_file() and n.schema_path.is_file()
    ]


def check_catalogs(
    old_root: Path | None, new_root: Path, *, upcaster_exists: UpcasterExists
) -> list[Incompatibility]:
    """All breaking changes between the contracts in ``old_root`` and ``new_root``.

    ``old_root`` None means there is nothing to compare against (first commit).
    """
    if old_root is None:
        return []
    old, new = load_catalog(old_root), load_catalog(new_root)
    findings: list[Incompatibility] = []

    for old_spec, new_spec in _pairs(old, new):
        if not old_spec.schema_path.is_file():
            continue  # the old side never had this schema: nothing anyone relies on
        if new_spec is None or not new_spec.schema_path.is_file():
            if old_spec.status == "deprecated":
                continue
            where = "removed from the catalog" if new_spec is None else "schema file deleted"
            findings.append(
                Incompatibility(
                    old_spec.type,
                    old_spec.version,
                    "data",
                    SCHEMA_DELETED,
                    f"{where} while the version is {old_spec.status}; deprecate it first",
                )
            )
            continue
        findings += compare_schemas(
            _read_schema(old_spec.schema_path),
            _read_schema(new_spec.schema_path),
            where="data",
            type_name=old_spec.type,
            version=old_spec.version,
        )

    for new_type in new:
        old_type = old.types.get(new_type.name)
        if old_type is None:
            continue  # a brand-new type: nobody depends on it yet
        for number in sorted(new_type.versions.keys() - old_type.versions.keys()):
            previous = number - 1
            if previous not in old_type.versions:
                continue
            prev_spec = new_type.versions.get(previous)
            if prev_spec is None or prev_spec.status == "deprecated":
                continue  # v(N) is gone (reported above if it was active) or deprecated
            if upcaster_exists(new_type.name, previous):
                continue
            findings.append(
                Incompatibility(
                    new_type.name,
                    number,
                    "data",
                    NEW_VERSION_WITHOUT_MIGRATION,
                    f"new major version v{number} needs an upcaster from v{previous} "
                    f"or v{previous} marked deprecated",
                )
            )
    return findings + producer_changes(old, new)


def producer_changes(old: Catalog, new: Catalog) -> list[Incompatibility]:
    """Types present on both sides whose producers changed (``producers_changed``, review).

    Adding a producer lets one more broker user publish the type; removing one makes the
    broker refuse a producer that may still be running. Either way the broker definitions
    must be regenerated and applied (``eventctl broker definitions|provision``). A ``runtime``
    event's producers are every service: a service added or removed is not flagged once per
    such event, only a change of its owner to or from ``runtime``.
    """
    findings: list[Incompatibility] = []
    for new_type in new:
        old_type = old.types.get(new_type.name)
        if old_type is None or set(old_type.producers) == set(new_type.producers):
            continue
        if old_type.owner == new_type.owner == RUNTIME:
            continue
        added = sorted(set(new_type.producers) - set(old_type.producers))
        removed = sorted(set(old_type.producers) - set(new_type.producers))
        what = "senders" if new_type.kind == "command" else "producers"
        parts = [f"may now be published by {', '.join(added)}"] if added else []
        if removed:
            parts.append(f"no longer by {', '.join(removed)} (the broker will refuse them)")
        findings.append(
            Incompatibility(
                new_type.name,
                0,
                what,
                PRODUCERS_CHANGED,
                f"{'; '.join(parts)}; review who may publish it, then regenerate and apply "
                "the broker users (eventctl broker definitions / provision)",
            )
        )
    return findings


# --------------------------------------------------------------------------- git


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    # git from PATH with fixed arguments: the developer's own tool on their own repository
    return subprocess.run(  # noqa: S603
        ["git", "-C", str(repo), *args],  # noqa: S607
        capture_output=True,
        check=False,
    )


def _rev(repo: Path, ref: str) -> str | None:
    proc = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if proc.returncode != 0:
        return None
    return proc.stdout.decode().strip() or None


def materialize_ref(repo: Path, ref: str, dest: Path, *, subdir: str = "contracts") -> Path | None:
    """Extract ``subdir`` (``contracts/``) as of ``ref`` into ``dest``; return its path there.

    Returns None when ``ref`` has no such directory; raises :class:`GitError` when ``ref``
    does not name a commit.
    """
    commit = _rev(repo, ref)
    if commit is None:
        raise GitError(f"{ref!r} is not a commit in {repo}")
    subdir = subdir.strip("/") or "."
    tree = f"{commit}^{{tree}}" if subdir == "." else f"{commit}:{subdir}"
    kind = _git(repo, "cat-file", "-t", tree)
    if kind.returncode != 0 or kind.stdout.decode().strip() != "tree":
        return None
    archive = dest / ".contracts.tar"
    proc = _git(repo, "archive", "--format=tar", f"--output={archive}", commit, "--", subdir)
    if proc.returncode != 0:
        raise GitError(f"git archive {ref} {subdir} failed: {proc.stderr.decode().strip()}")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    finally:
        archive.unlink(missing_ok=True)
    return dest / subdir


def default_base(repo: Path) -> str | None:
    """The revision to check against when none is given.

    On a branch: the merge-base with ``main`` (or ``origin/main``). On main itself: the
    previous commit ``HEAD~1``. None when there is neither (first commit, shallow clone).
    """
    head = _rev(repo, "HEAD")
    if head is None:
        return None
    for main in ("main", "origin/main"):
        main_commit = _rev(repo, main)
        if main_commit is None:
            continue
        if main_commit == head:
            break
        proc = _git(repo, "merge-base", "HEAD", main_commit)
        base = proc.stdout.decode().strip()
        if proc.returncode == 0 and base:
            return base
        break
    return "HEAD~1" if _rev(repo, "HEAD~1") is not None else None
