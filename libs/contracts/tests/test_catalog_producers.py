"""Who may publish a type: owners, foreign producers, command senders; and their review."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tributary.contracts.catalog import CatalogError, catalog, load_catalog, parse_catalog
from tributary.contracts.compat import PRODUCERS_CHANGED, check_catalogs


def _type(kind: str, owner: str, consumers: list[str], **extra: Any) -> dict[str, Any]:
    version = {"version": 1, "schema": "schemas/x.json", "status": "active", "pii": []}
    return {"kind": kind, "owner": owner, "consumers": consumers, "versions": [version], **extra}


def _raw() -> dict[str, Any]:
    return {
        "namespace": "com.tributary",
        "external_producers": {"comments-app": "comments"},
        "types": {
            "user.created": _type("event", "identity", ["audit"]),
            "comment.mentioned": _type(
                "event", "external", ["notification"], producers=["comments-app"]
            ),
            "email.send": _type("command", "notification", ["email"], senders=["notification"]),
        },
    }


def _parse(raw: dict[str, Any]) -> Any:
    return parse_catalog(Path("/nowhere"), raw)


def test_every_type_of_the_real_catalog_has_producers_it_knows() -> None:
    cat = catalog()
    for spec in cat:
        assert spec.producers, spec.name
        for producer in spec.producers:
            assert producer in cat.services or producer in cat.external_producers
    assert cat.type("comment.mentioned").producers == ("comments-app",)
    assert cat.type("report.ready").producers == ("reports-app",)
    assert cat.type("email.send").producers == ("notification",)
    assert cat.type("user.created").producers == ("identity",)
    assert {"billing", "notification"} <= set(cat.services)
    assert "external" not in cat.services
    assert "runtime" not in cat.services
    # the runtime of every service dead-letters, so every service announces it
    assert cat.type("message.dead_lettered").producers == cat.services
    for service in cat.services:
        assert "message.dead_lettered" in [s.name for s in cat.published_by(service)]


def test_producers_of_each_kind() -> None:
    cat = _parse(_raw())
    assert cat.type("user.created").producers == ("identity",)
    assert cat.type("comment.mentioned").producers == ("comments-app",)
    assert cat.type("email.send").producers == ("notification",)
    assert [s.name for s in cat.published_by("comments-app")] == ["comment.mentioned"]
    assert [s.name for s in cat.consumed_by("email")] == ["email.send"]
    assert cat.services == ("audit", "email", "identity", "notification")


def _edit(path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(_raw())
    *parents, last = path.split("/")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (_edit("types/comment.mentioned/producers", ["nobody-app"]), "unknown producer"),
        (_edit("types/comment.mentioned/producers", ["identity"]), "unknown producer"),
        (_edit("types/email.send/senders", ["notifcation"]), "unknown sender"),
        (_edit("types/user.created/producers", ["identity"]), "producers are listed only"),
        (_edit("types/email.send/producers", ["notification"]), "names its senders"),
        (_edit("types/comment.mentioned/senders", ["comments-app"]), "only commands"),
        (_edit("types/comment.mentioned/producers", "comments-app"), "malformed"),
        (_edit("types/email.send/senders", ["notification", "notification"]), "twice"),
        (_edit("external_producers/audit", "clash"), "name of a service"),
        (_edit("external_producers/idle-app", "publishes nothing"), "may publish no type"),
        (_edit("external_producers/Bad Name", "x"), "must match"),
        (_edit("external_producers", ["comments-app"]), "must map"),
        (_edit("external_producers/runtime", "x"), "must match"),
        (
            _edit("types/x.runtime", _type("event", "runtime", ["audit"], producers=["audit"])),
            "no producers",
        ),
        (_edit("types/x.runtime", _type("command", "runtime", ["audit"])), "for events"),
        (_edit("types/user.created/consumers", ["runtime"]), "cannot consume"),
    ],
)
def test_unknown_or_misplaced_producers_are_refused(raw: dict[str, Any], complaint: str) -> None:
    with pytest.raises(CatalogError, match=complaint):
        _parse(raw)


def test_a_runtime_event_is_produced_by_every_service() -> None:
    raw = _raw()
    raw["types"]["message.dead_lettered"] = _type("event", "runtime", ["audit"])
    cat = _parse(raw)
    assert cat.type("message.dead_lettered").producers == cat.services
    assert cat.services == ("audit", "email", "identity", "notification")
    assert [s.name for s in cat.published_by("email")] == ["message.dead_lettered"]
    assert "comments-app" not in cat.type("message.dead_lettered").producers


def test_a_new_service_changes_no_runtime_events_producers_for_review(tmp_path: Path) -> None:
    raw = _raw()
    raw["types"]["message.dead_lettered"] = _type("event", "runtime", ["audit"])
    old = _write(tmp_path / "old", raw)
    grown = copy.deepcopy(raw)
    grown["types"]["invoice.issued"] = _type("event", "invoicing", ["audit"])
    new = _write(tmp_path / "new", grown)
    assert "invoicing" in load_catalog(new).type("message.dead_lettered").producers
    assert check_catalogs(old, new, upcaster_exists=lambda _t, _v: False) == []
    # owned by one service after all: that is a change of who may publish it
    owned = copy.deepcopy(raw)
    owned["types"]["message.dead_lettered"]["owner"] = "audit"
    findings = check_catalogs(
        old, _write(tmp_path / "owned", owned), upcaster_exists=lambda _t, _v: False
    )
    assert [(f.type_name, f.rule) for f in findings] == [
        ("message.dead_lettered", PRODUCERS_CHANGED)
    ]


def test_a_catalog_from_before_producers_still_parses() -> None:
    raw = _raw()
    del raw["external_producers"]
    del raw["types"]["comment.mentioned"]["producers"]
    del raw["types"]["email.send"]["senders"]
    cat = _parse(raw)
    assert cat.type("comment.mentioned").producers == ()  # nobody may publish it
    assert cat.type("email.send").producers == ("notification",)  # its owner sends it


def _write(root: Path, raw: dict[str, Any]) -> Path:
    root.mkdir(parents=True)
    (root / "catalog.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return root


def test_a_change_of_producers_or_senders_is_flagged_for_review(tmp_path: Path) -> None:
    old = _write(tmp_path / "old", _raw())
    changed = _raw()
    changed["external_producers"] = {"other-app": "another"}
    changed["types"]["comment.mentioned"]["producers"] = ["other-app"]
    changed["types"]["email.send"]["senders"] = ["notification", "audit"]
    changed["types"]["user.created"]["owner"] = "onboarding"
    new = _write(tmp_path / "new", changed)

    findings = check_catalogs(old, new, upcaster_exists=lambda _t, _v: False)
    by_type = {f.type_name: f for f in findings}

    assert set(by_type) == {"comment.mentioned", "email.send", "user.created"}
    assert all(f.rule == PRODUCERS_CHANGED and f.needs_review for f in findings)
    mention = str(by_type["comment.mentioned"])
    assert "may now be published by other-app" in mention
    assert "no longer by comments-app (the broker will refuse them)" in mention
    assert str(by_type["email.send"]).startswith("email.send: senders: may now be published by")
    assert "no longer by identity" in str(by_type["user.created"])
    assert check_catalogs(old, old, upcaster_exists=lambda _t, _v: False) == []
    assert load_catalog(new).type("user.created").producers == ("onboarding",)
