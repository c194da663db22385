"""Looking up an event type or routing key: a spec, or :class:`CatalogError`, nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from tributary.contracts.catalog import CatalogError, catalog


@pytest.mark.parametrize(
    "ce_type",
    [
        pytest.param("com.tributary.user.created.v²", id="superscript-two"),
        pytest.param("com.tributary.user.created.v٢", id="arabic-indic-two"),
        pytest.param("com.tributary.user.created.v\uff12", id="fullwidth-two"),
        pytest.param("com.tributary.user.created.v02", id="leading-zero"),
        pytest.param("com.tributary.user.created.v0", id="zero"),
        pytest.param("com.tributary.user.created.v" + "9" * 5000, id="5000-digits"),
        pytest.param("com.tributary.user.created.v+2", id="sign"),
        pytest.param("com.tributary.user.created.v2\n", id="trailing-newline"),
        pytest.param("com.tributary.user.created.v", id="no-version"),
        pytest.param("com.tributary.user.created", id="unversioned"),
        pytest.param("com.tributary.user.deleted.v1", id="unknown-type"),
        pytest.param("com.tributary.user.created.v9", id="unknown-version"),
        pytest.param("org.example.user.created.v2", id="other-namespace"),
        pytest.param("", id="empty"),
        pytest.param(None, id="none"),
        pytest.param(b"com.tributary.user.created.v2", id="bytes"),
        pytest.param(["com.tributary.user.created.v2"], id="list"),
    ],
)
def test_anything_but_a_known_type_is_a_catalog_error(ce_type: Any) -> None:
    with pytest.raises(CatalogError):
        catalog().by_ce_type(ce_type)


def test_only_ascii_digits_without_a_leading_zero_are_versions() -> None:
    spec = catalog().by_ce_type("com.tributary.user.created.v2")
    assert (spec.type, spec.version) == ("user.created", 2)
    assert catalog().by_routing_key("user.created.v1").version == 1


def test_an_unhashable_type_name_is_a_catalog_error() -> None:
    with pytest.raises(CatalogError, match="unknown event type"):
        catalog().type(["user.created"])  # type: ignore[arg-type]
