import pytest

from tributary.contracts.upcasting import NoUpcastPath, has_upcaster, upcast
from tributary.contracts.validation import validate


def test_user_created_v1_upcasts_to_a_valid_v2() -> None:
    v1 = {
        "user_id": "usr_0123456789",
        "email": "ada@example.com",
        "name": "Ada King Lovelace",
        "plan": "pro",
        "locale": "en-GB",
        "created_at": "2026-01-01T00:00:00Z",
    }
    v2 = upcast("user.created", 1, v1, 2)
    assert v2["given_name"] == "Ada"
    assert v2["family_name"] == "King Lovelace"
    assert "name" not in v2
    validate("user.created.v2", v2, "strict")


def test_a_single_word_name_has_an_empty_family_name() -> None:
    v2 = upcast("user.created", 1, {"name": "Plato"}, 2)
    assert (v2["given_name"], v2["family_name"]) == ("Plato", "")


def test_the_same_version_is_returned_unchanged() -> None:
    assert upcast("role.changed", 1, {"a": 1}, 1) == {"a": 1}


def test_a_missing_step_is_reported() -> None:
    assert has_upcaster("user.created", 1)
    assert not has_upcaster("role.changed", 1)
    with pytest.raises(NoUpcastPath):
        upcast("role.changed", 1, {}, 2)
    with pytest.raises(NoUpcastPath):
        upcast("user.created", 2, {}, 1)


def test_any_whitespace_separates_given_and_family_name() -> None:
    v2 = upcast("user.created", 1, {"name": "Ada\tLovelace"}, 2)
    assert (v2["given_name"], v2["family_name"]) == ("Ada", "Lovelace")
