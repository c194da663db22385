"""Contract compatibility rules, table-driven: one row per kind of change."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tributary.contracts.compat import (
    RULES,
    GitError,
    Incompatibility,
    check_catalogs,
    compare_schemas,
    compared_versions,
    default_base,
    materialize_ref,
)

Schema = dict[str, Any]


def obj(props: Mapping[str, Any], required: Iterable[str] = (), **keywords: Any) -> Schema:
    """An object schema like the ones under contracts/schemas/ (closed by default)."""
    schema: Schema = {"type": "object", "additionalProperties": False}
    schema.update(keywords)
    schema["required"] = list(required)
    schema["properties"] = dict(props)
    return schema


def one(field: Schema | bool, *, required: bool = False) -> Schema:
    """A payload with the single property ``f``."""
    return obj({"f": field}, ["f"] if required else [])


STR: Schema = {"type": "string"}
ADDRESS = obj({"city": STR, "zip": STR}, ["city"])
TAGS: Schema = {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 10}
USER = obj({"user_id": STR, "email": STR, "address": ADDRESS}, ["user_id", "email"])

# (id, old, new, expected rule, expected field path)
INCOMPATIBLE: list[tuple[str, Schema, Schema, str, str]] = [
    # property_removed
    (
        "required-property-removed",
        USER,
        obj({"user_id": STR, "address": ADDRESS}, ["user_id"]),
        "property_removed",
        "data.email",
    ),
    ("optional-property-removed", one(STR), obj({}), "property_removed", "data.f"),
    (
        "nested-property-removed",
        USER,
        obj({**USER["properties"], "address": obj({"city": STR}, ["city"])}, USER["required"]),
        "property_removed",
        "data.address.zip",
    ),
    # type_changed
    ("type-changed", one({"type": "integer"}), one(STR), "type_changed", "data.f"),
    (
        "number-to-integer",
        one({"type": "number"}),
        one({"type": "integer"}),
        "type_changed",
        "data.f",
    ),
    (
        "type-list-narrowed",
        one({"type": ["string", "null"]}),
        one(STR),
        "type_changed",
        "data.f",
    ),
    ("type-added", one({}), one(STR), "type_changed", "data.f"),
    ("type-added-contradicting-enum", one({"enum": ["a", 1]}), one(STR), "type_changed", "data.f"),
    (
        "type-changed-in-items",
        one(TAGS),
        one({**TAGS, "items": {"type": "integer"}}),
        "type_changed",
        "data.f[]",
    ),
    (
        "object-became-string",
        one(ADDRESS),
        one(STR),
        "type_changed",
        "data.f",
    ),
    ("schema-became-false", one(STR), one(False), "type_changed", "data.f"),
    # made_required
    (
        "existing-property-made-required",
        one(STR),
        one(STR, required=True),
        "made_required",
        "data.f",
    ),
    ("new-required-property", obj({}), one(STR, required=True), "made_required", "data.f"),
    (
        "nested-property-made-required",
        one(ADDRESS),
        one(obj(ADDRESS["properties"], ["city", "zip"])),
        "made_required",
        "data.f.zip",
    ),
    # made_optional
    ("required-made-optional", one(STR, required=True), one(STR), "made_optional", "data.f"),
    (
        "nested-required-made-optional",
        one(ADDRESS),
        one(obj(ADDRESS["properties"])),
        "made_optional",
        "data.f.city",
    ),
    # enum_narrowed
    (
        "enum-value-removed",
        one({"type": "string", "enum": ["free", "pro"]}),
        one({"type": "string", "enum": ["free"]}),
        "enum_narrowed",
        "data.f",
    ),
    ("enum-added", one(STR), one({"type": "string", "enum": ["free"]}), "enum_narrowed", "data.f"),
    (
        "enum-value-removed-in-items",
        one({"type": "array", "items": {"enum": ["a", "b"]}}),
        one({"type": "array", "items": {"enum": ["a"]}}),
        "enum_narrowed",
        "data.f[]",
    ),
    # const_changed
    ("const-changed", one({"const": "web"}), one({"const": "app"}), "const_changed", "data.f"),
    (
        "const-added",
        one({"type": "string"}),
        one({"type": "string", "const": "web"}),
        "const_changed",
        "data.f",
    ),
    # format_tightened
    (
        "format-added",
        one(STR),
        one({"type": "string", "format": "email"}),
        "format_tightened",
        "data.f",
    ),
    (
        "format-changed",
        one({"type": "string", "format": "uuid"}),
        one({"type": "string", "format": "uri"}),
        "format_tightened",
        "data.f",
    ),
    # pattern_tightened
    (
        "pattern-added",
        one(STR),
        one({"type": "string", "pattern": "^[a-z]+$"}),
        "pattern_tightened",
        "data.f",
    ),
    (
        "pattern-changed",
        one({"type": "string", "pattern": "^[A-Z]{3}$"}),
        one({"type": "string", "pattern": "^[A-Z]{4}$"}),
        "pattern_tightened",
        "data.f",
    ),
    # bound_tightened
    (
        "maxLength-added",
        one(STR),
        one({"type": "string", "maxLength": 36}),
        "bound_tightened",
        "data.f",
    ),
    (
        "maxLength-lowered",
        one({"type": "string", "maxLength": 254}),
        one({"type": "string", "maxLength": 100}),
        "bound_tightened",
        "data.f",
    ),
    (
        "minLength-added",
        one(STR),
        one({"type": "string", "minLength": 1}),
        "bound_tightened",
        "data.f",
    ),
    (
        "minLength-raised",
        one({"type": "string", "minLength": 1}),
        one({"type": "string", "minLength": 2}),
        "bound_tightened",
        "data.f",
    ),
    (
        "maximum-added",
        one({"type": "integer"}),
        one({"type": "integer", "maximum": 9}),
        "bound_tightened",
        "data.f",
    ),
    (
        "maximum-lowered",
        one({"type": "integer", "maximum": 100}),
        one({"type": "integer", "maximum": 50}),
        "bound_tightened",
        "data.f",
    ),
    (
        "minimum-added",
        one({"type": "integer"}),
        one({"type": "integer", "minimum": 0}),
        "bound_tightened",
        "data.f",
    ),
    (
        "minimum-raised",
        one({"type": "integer", "minimum": 0}),
        one({"type": "integer", "minimum": 1}),
        "bound_tightened",
        "data.f",
    ),
    (
        "exclusiveMaximum-added",
        one({"type": "integer"}),
        one({"type": "integer", "exclusiveMaximum": 10}),
        "bound_tightened",
        "data.f",
    ),
    (
        "maxItems-added",
        one({"type": "array"}),
        one({"type": "array", "maxItems": 5}),
        "bound_tightened",
        "data.f",
    ),
    ("maxItems-lowered", one(TAGS), one({**TAGS, "maxItems": 5}), "bound_tightened", "data.f"),
    ("minItems-added", one(TAGS), one({**TAGS, "minItems": 1}), "bound_tightened", "data.f"),
    (
        "minItems-raised",
        one({**TAGS, "minItems": 1}),
        one({**TAGS, "minItems": 2}),
        "bound_tightened",
        "data.f",
    ),
    (
        "maxLength-lowered-in-items",
        one(TAGS),
        one({**TAGS, "items": {"type": "string", "maxLength": 10}}),
        "bound_tightened",
        "data.f[]",
    ),
    (
        "multipleOf-added",
        one({"type": "integer"}),
        one({"type": "integer", "multipleOf": 5}),
        "bound_tightened",
        "data.f",
    ),
    (
        "uniqueItems-switched-on",
        one(TAGS),
        one({**TAGS, "uniqueItems": True}),
        "bound_tightened",
        "data.f",
    ),
    # additional_properties_tightened
    (
        "additionalProperties-absent-to-false",
        one({"type": "object"}),
        one({"type": "object", "additionalProperties": False}),
        "additional_properties_tightened",
        "data.f",
    ),
    (
        "additionalProperties-true-to-false",
        one({"type": "object", "additionalProperties": True}),
        one({"type": "object", "additionalProperties": False}),
        "additional_properties_tightened",
        "data.f",
    ),
    (
        "additionalProperties-absent-to-schema",
        one({"type": "object"}),
        one({"type": "object", "additionalProperties": STR}),
        "additional_properties_tightened",
        "data.f",
    ),
    (
        "additionalProperties-schema-to-false",
        one({"type": "object", "additionalProperties": STR}),
        one({"type": "object", "additionalProperties": False}),
        "additional_properties_tightened",
        "data.f",
    ),
    (
        "root-additionalProperties-closed",
        {"type": "object", "properties": {"f": STR}},
        {"type": "object", "properties": {"f": STR}, "additionalProperties": False},
        "additional_properties_tightened",
        "data",
    ),
    (
        "additionalProperties-schema-tightened",
        one({"type": "object", "additionalProperties": STR}),
        one({"type": "object", "additionalProperties": {"type": "string", "maxLength": 3}}),
        "bound_tightened",
        "data.f.*",
    ),
    # keyword_changed: validation keywords without a dedicated rule
    (
        "not-added",
        one(STR),
        one({"type": "string", "not": {"const": "root"}}),
        "keyword_changed",
        "data.f",
    ),
    (
        "anyOf-alternative-removed",
        one({"anyOf": [STR, {"type": "null"}]}),
        one({"anyOf": [STR]}),
        "keyword_changed",
        "data.f",
    ),
]

# (id, old, new): changes that must produce no finding at all
COMPATIBLE: list[tuple[str, Schema, Schema]] = [
    ("identical", USER, USER),
    ("new-optional-property", USER, obj({**USER["properties"], "phone": STR}, USER["required"])),
    (
        "new-optional-nested-property",
        one(ADDRESS),
        one(obj({**ADDRESS["properties"], "country": STR}, ["city"])),
    ),
    (
        "new-optional-object-with-required-fields",
        obj({}),
        one(obj({"a": STR}, ["a"])),
    ),
    (
        "new-enum-value",
        one({"type": "string", "enum": ["free", "pro"]}),
        one({"type": "string", "enum": ["free", "pro", "team"]}),
    ),
    ("enum-removed", one({"type": "string", "enum": ["free"]}), one(STR)),
    ("type-added-matching-const", one({"const": "web"}), one({"type": "string", "const": "web"})),
    ("const-widened-to-enum", one({"const": "web"}), one({"enum": ["web", "app"]})),
    (
        "description-title-examples-edited",
        one({"type": "string", "description": "old", "title": "F", "examples": ["a"]}),
        one({"type": "string", "description": "new", "title": "G", "examples": ["b", "c"]}),
    ),
    (
        "x-pii-edited",
        one({"type": "string", "x-pii": True}),
        one({"type": "string", "x-pii": False}),
    ),
    (
        "root-metadata-edited",
        {**USER, "$id": "a", "title": "v1", "description": "x"},
        {**USER, "$id": "b", "title": "v1!", "description": "y", "$comment": "z"},
    ),
    (
        "maxLength-raised",
        one({"type": "string", "maxLength": 100}),
        one({"type": "string", "maxLength": 254}),
    ),
    ("maxLength-removed", one({"type": "string", "maxLength": 100}), one(STR)),
    (
        "minLength-lowered",
        one({"type": "string", "minLength": 2}),
        one({"type": "string", "minLength": 1}),
    ),
    (
        "minimum-lowered-maximum-raised",
        one({"type": "integer", "minimum": 1, "maximum": 10}),
        one({"type": "integer", "minimum": 0, "maximum": 20}),
    ),
    ("maxItems-raised", one(TAGS), one({**TAGS, "maxItems": 50})),
    (
        "multipleOf-divisor",
        one({"type": "number", "multipleOf": 10}),
        one({"type": "number", "multipleOf": 5}),
    ),
    ("format-removed", one({"type": "string", "format": "email"}), one(STR)),
    ("pattern-removed", one({"type": "string", "pattern": "^a$"}), one(STR)),
    ("type-widened-to-list", one(STR), one({"type": ["string", "null"]})),
    ("integer-to-number", one({"type": "integer"}), one({"type": "number"})),
    ("type-removed", one(STR), one({})),
    (
        "additionalProperties-false-to-true",
        one(obj({"a": STR})),
        one({**obj({"a": STR}), "additionalProperties": True}),
    ),
    (
        "anyOf-alternative-added",
        one({"anyOf": [STR]}),
        one({"anyOf": [STR, {"type": "null"}]}),
    ),
    (
        "property-order-changed",
        obj({"a": STR, "b": STR}, ["a", "b"]),
        obj({"b": STR, "a": STR}, ["b", "a"]),
    ),
]


def _rows(findings: list[Incompatibility]) -> list[tuple[str, str]]:
    return [(f.rule, f.path) for f in findings]


@pytest.mark.parametrize(
    ("old", "new", "rule", "path"),
    [pytest.param(old, new, rule, path, id=name) for name, old, new, rule, path in INCOMPATIBLE],
)
def test_an_incompatible_change_yields_exactly_its_rule(
    old: Schema, new: Schema, rule: str, path: str
) -> None:
    findings = compare_schemas(old, new, where="data", type_name="user.created", version=1)
    assert _rows(findings) == [(rule, path)]
    assert str(findings[0]).startswith(f"user.created v1: {path}: ")
    assert str(findings[0]).endswith(f"({rule})")


@pytest.mark.parametrize(
    ("old", "new"),
    [pytest.param(old, new, id=name) for name, old, new in COMPATIBLE],
)
def test_a_compatible_change_yields_nothing(old: Schema, new: Schema) -> None:
    assert compare_schemas(old, new, where="data") == []


def test_every_schema_rule_is_covered_by_the_table() -> None:
    covered = {rule for *_, rule, _ in INCOMPATIBLE}
    catalog_rules = {"schema_deleted", "new_version_without_migration"}
    assert covered == set(RULES) - catalog_rules


def test_a_finding_reads_type_version_field_message_and_rule() -> None:
    old = obj({"email": STR}, ["email"])
    [finding] = compare_schemas(old, obj({}), where="data", type_name="user.created", version=1)
    assert finding == Incompatibility(
        "user.created", 1, "data.email", "property_removed", "property removed"
    )
    assert str(finding) == "user.created v1: data.email: property removed (property_removed)"


def test_every_breaking_change_is_reported_not_just_the_first() -> None:
    new = obj({"user_id": {"type": "integer"}, "address": ADDRESS}, ["user_id", "address"])
    assert sorted(_rows(compare_schemas(USER, new, where="data"))) == [
        ("made_required", "data.address"),
        ("property_removed", "data.email"),
        ("type_changed", "data.user_id"),
    ]


def _with_defs(address: Schema, *, def_name: str = "address") -> Schema:
    return {
        **obj({"address": {"$ref": f"#/$defs/{def_name}"}}),
        "$defs": {def_name: address},
    }


def test_local_refs_are_followed() -> None:
    old = _with_defs(ADDRESS)
    assert compare_schemas(old, _with_defs(ADDRESS, def_name="addr"), where="data") == []
    narrowed = _with_defs(obj({"city": STR}, ["city"]))
    assert _rows(compare_schemas(old, narrowed, where="data")) == [
        ("property_removed", "data.address.zip")
    ]


def test_recursive_refs_terminate() -> None:
    node = {
        "type": "object",
        "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
    }
    schema = {**obj({"root": {"$ref": "#/$defs/node"}}), "$defs": {"node": node}}
    assert compare_schemas(schema, schema, where="data") == []


# --------------------------------------------------------------------------- catalogs

# A fixture catalog: type -> [(version, status, schema or None = no schema file)]
Versions = list[tuple[int, str, Schema | None]]
CatalogSpec = dict[str, Versions]

V1: Schema = obj({"email": STR}, ["email"])
V2: Schema = obj({"given_name": STR}, ["given_name"])


def write_catalog(root: Path, spec: CatalogSpec) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "schemas").mkdir(exist_ok=True)
    types: dict[str, Any] = {}
    for name, versions in spec.items():
        entries = []
        for number, status, schema in versions:
            rel = f"schemas/{name}.v{number}.json"
            entry: dict[str, Any] = {"version": number, "schema": rel, "status": status, "pii": []}
            if status == "deprecated":
                entry["deprecated_since"] = "2026-01-01"
            entries.append(entry)
            if schema is not None:
                (root / rel).write_text(json.dumps(schema, indent=2), encoding="utf-8")
        types[name] = {
            "kind": "event",
            "owner": "identity",
            "description": name,
            "consumers": ["audit"],
            "irreversible_for": [],
            "versions": entries,
        }
    raw = {"namespace": "com.tributary", "types": types}
    (root / "catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return root


# (id, old catalog, new catalog, upcasters (type, from_version), expected (type, version, rule))
CATALOG_CASES: list[
    tuple[str, CatalogSpec, CatalogSpec, set[tuple[str, int]], list[tuple[str, int, str]]]
] = [
    (
        "unchanged",
        {"user.created": [(1, "active", V1)]},
        {"user.created": [(1, "active", V1)]},
        set(),
        [],
    ),
    (
        "schema-changed-incompatibly",
        {"user.created": [(1, "active", V1)]},
        {"user.created": [(1, "active", obj({}))]},
        set(),
        [("user.created", 1, "property_removed")],
    ),
    (
        "schema-file-deleted-while-active",
        {"user.created": [(1, "active", V1)]},
        {"user.created": [(1, "active", None)]},
        set(),
        [("user.created", 1, "schema_deleted")],
    ),
    (
        "version-removed-from-catalog-while-active",
        {"user.created": [(1, "active", V1), (2, "active", V2)]},
        {"user.created": [(2, "active", V2)]},
        set(),
        [("user.created", 1, "schema_deleted")],
    ),
    (
        "type-removed-while-active",
        {"user.created": [(1, "active", V1)], "role.changed": [(1, "active", V1)]},
        {"role.changed": [(1, "active", V1)]},
        set(),
        [("user.created", 1, "schema_deleted")],
    ),
    (
        "deprecated-and-deleted-in-one-change",
        {"user.created": [(1, "active", V1), (2, "active", V2)]},
        {"user.created": [(1, "deprecated", None), (2, "active", V2)]},
        set(),
        [("user.created", 1, "schema_deleted")],
    ),
    (
        "deprecated-version-file-deleted",
        {"user.created": [(1, "deprecated", V1), (2, "active", V2)]},
        {"user.created": [(1, "deprecated", None), (2, "active", V2)]},
        set(),
        [],
    ),
    (
        "deprecated-version-removed-from-catalog",
        {"user.created": [(1, "deprecated", V1), (2, "active", V2)]},
        {"user.created": [(2, "active", V2)]},
        set(),
        [],
    ),
    (
        "new-major-without-upcaster-or-deprecation",
        {"user.created": [(1, "active", V1)]},
        {"user.created": [(1, "active", V1), (2, "active", V2)]},
        set(),
        [("user.created", 2, "new_version_without_migration")],
    ),
    (
        "new-major-with-old-deprecated",
        {"user.created": [(1, "active", V1)]},
        {"user.created": [(1, "deprecated", V1), (2, "active", V2)]},
        set(),
        [],
    ),
    (
        "new-major-with-upcaster",
        {"user.created": [(1, "active", V1)]},
        {"user.created": [(1, "active", V1), (2, "active", V2)]},
        {("user.created", 1)},
        [],
    ),
    (
        "upcaster-for-another-type-does-not-count",
        {"user.created": [(1, "active", V1)]},
        {"user.created": [(1, "active", V1), (2, "active", V2)]},
        {("role.changed", 1)},
        [("user.created", 2, "new_version_without_migration")],
    ),
    (
        "new-type-with-version-file",
        {"user.created": [(1, "active", V1)]},
        {"user.created": [(1, "active", V1)], "role.changed": [(1, "active", V1)]},
        set(),
        [],
    ),
    (
        "old-catalog-without-schema-files",
        {"user.created": [(1, "active", None)]},
        {"user.created": [(1, "active", V1)]},
        set(),
        [],
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "upcasters", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in CATALOG_CASES],
)
def test_check_catalogs(
    tmp_path: Path,
    old: CatalogSpec,
    new: CatalogSpec,
    upcasters: set[tuple[str, int]],
    expected: list[tuple[str, int, str]],
) -> None:
    old_root = write_catalog(tmp_path / "old", old)
    new_root = write_catalog(tmp_path / "new", new)
    findings = check_catalogs(old_root, new_root, upcaster_exists=lambda t, v: (t, v) in upcasters)
    assert [(f.type_name, f.version, f.rule) for f in findings] == expected


def test_without_an_old_catalog_there_is_nothing_to_compare(tmp_path: Path) -> None:
    new_root = write_catalog(tmp_path / "new", {"user.created": [(1, "active", V1)]})
    assert check_catalogs(None, new_root, upcaster_exists=lambda t, v: False) == []
    assert compared_versions(None, new_root) == []


def test_compared_versions_counts_schemas_present_on_both_sides(tmp_path: Path) -> None:
    old_root = write_catalog(
        tmp_path / "old",
        {"user.created": [(1, "deprecated", V1), (2, "active", V2)], "x.y": [(1, "active", None)]},
    )
    new_root = write_catalog(tmp_path / "new", {"user.created": [(2, "active", V2)]})
    assert compared_versions(old_root, new_root) == [("user.created", 2)]


def test_the_upcaster_check_asks_for_the_step_from_the_old_major(tmp_path: Path) -> None:
    asked: list[tuple[str, int]] = []

    def upcaster_exists(type_name: str, version: int) -> bool:
        asked.append((type_name, version))
        return True

    old_root = write_catalog(tmp_path / "old", {"user.created": [(1, "active", V1)]})
    new_root = write_catalog(
        tmp_path / "new", {"user.created": [(1, "active", V1), (2, "active", V2)]}
    )
    assert check_catalogs(old_root, new_root, upcaster_exists=upcaster_exists) == []
    assert asked == [("user.created", 1)]


# --------------------------------------------------------------------------- git


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    return path


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    proc = subprocess.run(
        ["git", "-C", str(repo), "-c", "commit.gpgsign=false", *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return proc.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def test_default_base_on_the_first_commit_is_none(repo: Path) -> None:
    assert default_base(repo) is None  # no commit at all
    commit_all(repo, "first")
    assert default_base(repo) is None


def test_default_base_on_main_is_the_previous_commit(repo: Path) -> None:
    commit_all(repo, "first")
    commit_all(repo, "second")
    assert default_base(repo) == "HEAD~1"


def test_default_base_on_a_branch_is_the_merge_base_with_main(repo: Path) -> None:
    fork = commit_all(repo, "first")
    git(repo, "checkout", "-q", "-b", "feature")
    commit_all(repo, "on feature")
    git(repo, "checkout", "-q", "main")
    commit_all(repo, "on main")
    git(repo, "checkout", "-q", "feature")
    assert default_base(repo) == fork


def test_materialize_ref_extracts_contracts_as_of_the_ref(repo: Path, tmp_path: Path) -> None:
    write_catalog(repo / "contracts", {"user.created": [(1, "active", V1)]})
    first = commit_all(repo, "contracts")
    (repo / "contracts" / "schemas" / "user.created.v1.json").write_text("{}", encoding="utf-8")
    commit_all(repo, "edit")
    dest = tmp_path / "out"
    dest.mkdir()
    root = materialize_ref(repo, first, dest)
    assert root == dest / "contracts"
    assert json.loads((root / "schemas" / "user.created.v1.json").read_text()) == V1
    assert (root / "catalog.yaml").is_file()


def test_materialize_ref_without_contracts_is_none(repo: Path, tmp_path: Path) -> None:
    (repo / "README").write_text("hi", encoding="utf-8")
    commit_all(repo, "no contracts")
    assert materialize_ref(repo, "HEAD", tmp_path) is None


def test_materialize_ref_rejects_an_unknown_ref(repo: Path, tmp_path: Path) -> None:
    commit_all(repo, "first")
    with pytest.raises(GitError):
        materialize_ref(repo, "no-such-ref", tmp_path)
