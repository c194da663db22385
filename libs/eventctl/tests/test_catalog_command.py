"""``eventctl catalog``: the table, JSON and the Mermaid flowchart, all from contracts/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tributary.contracts.catalog import catalog, load_catalog
from tributary.eventctl.catalog_command import (
    EXCHANGE,
    RUNTIME_NODE,
    catalog_edges,
    flow_edges,
    label_types,
    mermaid,
    mermaid_blocks,
)
from tributary.eventctl.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["catalog", *argv]) == 0
    return capsys.readouterr().out


def test_the_table_shows_every_type_with_owner_consumers_versions_and_pii(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run(capsys).splitlines()
    assert out[0].split() == [
        "TYPE", "KIND", "OWNER", "PRODUCERS", "CONSUMERS", "VERSIONS", "PII", "FIELDS"
    ]  # fmt: skip
    by_type = {line.split()[0]: line for line in out[1:]}
    assert set(by_type) == {spec.name for spec in catalog()}
    created = by_type["user.created"]
    assert "identity" in created
    assert "onboarding, email, notification, audit" in created
    assert "v1 (deprecated), v2" in created
    assert "v2: email, given_name, family_name" in created
    assert "every service" in by_type["message.dead_lettered"]
    assert "command" in by_type["email.send"]


def test_json_has_every_type_and_the_edges(capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(run(capsys, "--format", "json"))
    types = {t["type"]: t for t in data["types"]}
    assert set(types) == {spec.name for spec in catalog()}
    assert types["comment.mentioned"]["producers"] == ["comments-app"]
    assert types["comment.mentioned"]["pii"] == ["v1: excerpt"]
    assert {tuple(e) for e in data["edges"]} == catalog_edges(catalog())
    assert set(data["external_producers"]) == set(catalog().external_producers)


def test_the_flowchart_draws_exactly_the_catalogs_edges(
    capsys: pytest.CaptureFixture[str],
) -> None:
    flow = run(capsys, "--format", "mermaid")
    assert flow.startswith("flowchart LR")
    assert flow_edges(flow, catalog()) == catalog_edges(catalog())
    # the runtime's type comes from one node, not from every service
    assert (RUNTIME_NODE, EXCHANGE, "message.dead_lettered") in catalog_edges(catalog())
    assert "identity -->|" in flow
    assert "comments_app -->|" in flow
    fenced = run(capsys, "--format", "mermaid", "--fenced")
    assert mermaid_blocks(fenced) == [flow]


def test_a_changed_catalog_changes_the_flowchart(tmp_path: Path) -> None:
    """A new consumer in contracts/ appears in the picture: it is generated, not drawn."""
    source = catalog().root
    raw = yaml.safe_load((source / "catalog.yaml").read_text(encoding="utf-8"))
    raw["types"]["role.changed"]["consumers"].append("notification")
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    (tmp_path / "schemas").symlink_to(source / "schemas")
    changed = load_catalog(tmp_path)

    assert (EXCHANGE, "notification", "role.changed") in flow_edges(mermaid(changed), changed)
    assert (EXCHANGE, "notification", "role.changed") not in catalog_edges(catalog())


def test_labels_name_types_as_whole_words() -> None:
    known = ["email.send", "email.sent", "user.created", "subscription.activated"]
    assert label_types('"email.send command;<br/>user.created"', known, []) == {
        "email.send",
        "user.created",
    }
    assert label_types("subscription.activation_rejected", known, []) == set()
    assert label_types('"every event type"', known, ["user.created"]) == {"user.created"}


def test_a_missing_contracts_directory_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["catalog", "--contracts", str(tmp_path / "nope")]) == 2
    assert "eventctl:" in capsys.readouterr().err


@given(st.text(max_size=300))
def test_any_text_reads_as_a_flowchart_without_raising(text: str) -> None:
    edges = flow_edges(text, catalog())
    assert all(EXCHANGE in (a, b) for a, b, _ in edges)
