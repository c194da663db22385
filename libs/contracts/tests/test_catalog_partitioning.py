"""The catalog's ``partitioning``: which services have partition queues, which types carry slots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tributary.contracts.catalog import MAX_SLOTS, CatalogError, catalog, parse_catalog


def _type(kind: str, owner: str, consumers: list[str], **extra: Any) -> dict[str, Any]:
    version = {"version": 1, "schema": "schemas/x.json", "status": "active", "pii": []}
    return {"kind": kind, "owner": owner, "consumers": consumers, "versions": [version], **extra}


def _raw(partitioning: Any = None, **types: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "namespace": "com.tributary",
        "external_producers": {"comments-app": "comments"},
        "types": {
            "user.created": _type("event", "identity", ["audit", "email"]),
            "user.erased": _type("event", "identity", ["email"]),
            "comment.mentioned": _type(
                "event", "external", ["notification"], producers=["comments-app"]
            ),
            "audit.job": _type("command", "audit", ["audit"]),
            **types,
        },
    }
    if partitioning is not None:
        raw["partitioning"] = partitioning
    return raw


def _parse(raw: dict[str, Any]) -> Any:
    return parse_catalog(Path("/nowhere"), raw)


def test_without_partitioning_nothing_is_partitioned() -> None:
    cat = _parse(_raw())
    assert cat.partitioning.slots == 0
    assert cat.partitioning.partitions("audit") == 0
    assert not any(spec.partitioned for spec in cat)


def test_the_real_catalog_parses_with_its_partitioning() -> None:
    cat = catalog()
    for service, count in cat.partitioning.services.items():
        assert 1 <= count <= cat.partitioning.slots
        assert all(spec.partitioned for spec in cat.consumed_by(service) if spec.kind == "event")


def test_the_events_a_partitioned_service_consumes_carry_slots() -> None:
    cat = _parse(_raw({"slots": 32, "services": {"audit": 4}}))
    assert cat.partitioning.partitions("audit") == 4
    assert cat.partitioning.partitions("email") == 0
    # user.created goes to audit: slotted for every consumer; user.erased is email's only
    assert cat.type("user.created").slots == 32
    assert cat.type("user.created").partitioned
    assert not cat.type("user.erased").partitioned
    # a command keeps its own queue
    assert not cat.type("audit.job").partitioned


@pytest.mark.parametrize(
    ("partitioning", "complaint"),
    [
        ("yes", "'slots' and 'services'"),
        ({"slots": 8, "services": {}, "extra": 1}, "'slots' and 'services'"),
        ({"slots": 0, "services": {}}, "from 1 to"),
        ({"slots": MAX_SLOTS + 1, "services": {}}, "from 1 to"),
        ({"slots": True, "services": {}}, "from 1 to"),
        ({"slots": "8", "services": {}}, "from 1 to"),
        ({"slots": 8, "services": ["audit"]}, "maps each service"),
        ({"slots": 8, "services": {"nobody": 2}}, "no service"),
        ({"slots": 8, "services": {"audit": 0}}, "needs 1 to 8"),
        ({"slots": 8, "services": {"audit": 9}}, "needs 1 to 8"),
        ({"slots": 8, "services": {"audit": 2.0}}, "needs 1 to 8"),
    ],
)
def test_malformed_partitioning_is_refused(partitioning: Any, complaint: str) -> None:
    with pytest.raises(CatalogError, match=complaint):
        _parse(_raw(partitioning))


def test_a_foreign_producer_cannot_feed_a_partitioned_service() -> None:
    # comments-app publishes outside this repo: it would not add the slot word
    with pytest.raises(CatalogError, match="outside this repo"):
        _parse(_raw({"slots": 8, "services": {"notification": 2}}))


def test_a_type_whose_name_another_extends_cannot_be_partitioned() -> None:
    # "user.created.*.*" would also bind user.created.extra.v1
    raw = _raw(
        {"slots": 8, "services": {"audit": 2}},
        **{"user.created.extra": _type("event", "identity", ["email"])},
    )
    with pytest.raises(CatalogError, match="extend its name"):
        _parse(raw)
