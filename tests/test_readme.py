"""The README's reference tables agree with the code they describe: the scope table with the
scopes tokens can carry, the event catalog table with ``contracts/catalog.yaml``."""

from __future__ import annotations

import re
from pathlib import Path

from tributary.contracts.catalog import load_catalog
from tributary.service.auth import SCOPES, SELF_SCOPES

README = Path(__file__).resolve().parents[1] / "README.md"
OWNER_WORDS = {"external": "external producers", "runtime": "every service's runtime"}


def table_after(header: str) -> list[list[str]]:
    """The rows (cells stripped) of the Markdown table whose header line is ``header``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def names(cell: str) -> list[str]:
    """The code spans of a cell: "`a`, `b` (command)" -> ["a", "b"]."""
    return re.findall(r"`([^`]+)`", cell)


def words(cell: str) -> set[str]:
    return {w.strip() for w in re.sub(r"\(.*?\)", "", cell).split(",") if w.strip()}


def test_the_scope_table_lists_every_scope_and_who_gets_it() -> None:
    rows = table_after("| scope | granted to | allows |")
    listed = {names(scope)[0]: granted for scope, granted, _ in rows}
    assert set(listed) == set(SCOPES), "README scope table vs tributary.service.auth.SCOPES"
    for scope, granted in listed.items():
        expected = "every user" if scope in SELF_SCOPES else "admin, owner"
        assert granted == expected, f"{scope}: README says {granted!r}"


def test_the_catalog_table_matches_the_catalog() -> None:
    catalog = load_catalog()
    rows = table_after("| type | owner | consumers | versions |")
    seen: set[str] = set()
    for types, owner, consumers, versions in rows:
        for name in names(types):
            spec = catalog.type(name)
            seen.add(name)
            assert ("(command)" in types) == (spec.kind == "command"), name
            expected_owner = OWNER_WORDS.get(spec.owner, spec.owner)
            assert owner == expected_owner, f"{name}: owner {owner!r}, catalog {spec.owner!r}"
            assert words(consumers) == set(spec.consumers), (
                f"{name}: README consumers {sorted(words(consumers))}, "
                f"catalog {sorted(spec.consumers)}"
            )
            expected_versions = ", ".join(
                f"v{v.version}" + (" (deprecated)" if v.status == "deprecated" else "")
                for v in sorted(spec.versions.values(), key=lambda v: v.version)
            )
            assert versions == expected_versions, f"{name}: {versions!r}"
    assert seen == {spec.name for spec in catalog}, "types missing from the README catalog table"
