from typing import Any

import pytest

from tributary.contracts import upcasting
from tributary.contracts.upcasting import NoUpcastPath, UpcastFailed, has_upcaster, upcast
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


class _OddError(Exception):
    """Nothing expects this type."""


@pytest.mark.parametrize("raised", [KeyError, ValueError, TypeError, RecursionError, _OddError])
def test_an_upcaster_that_raises_is_an_upcast_failure_not_a_missing_path(
    monkeypatch: pytest.MonkeyPatch, raised: type[Exception]
) -> None:
    def broken(data: dict[str, Any]) -> dict[str, Any]:
        raise raised("bug in the upcaster")

    monkeypatch.setitem(upcasting._UPCASTERS, ("test.probe", 1), broken)
    with pytest.raises(UpcastFailed, match=f"test.probe v1 to v2 raised {raised.__name__}") as err:
        upcast("test.probe", 1, {"a": 1}, 2)
    assert isinstance(err.value.__cause__, raised)
    assert not isinstance(err.value, NoUpcastPath)


def test_an_upcaster_that_returns_no_object_is_an_upcast_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(upcasting._UPCASTERS, ("test.probe", 1), lambda data: [data])
    with pytest.raises(UpcastFailed, match="returned list"):
        upcast("test.probe", 1, {"a": 1}, 2)


def test_an_interrupt_inside_an_upcaster_is_not_a_message_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(data: dict[str, Any]) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setitem(upcasting._UPCASTERS, ("test.probe", 1), interrupted)
    with pytest.raises(KeyboardInterrupt):
        upcast("test.probe", 1, {}, 2)


def test_a_v1_user_created_without_a_name_is_an_upcast_failure() -> None:
    with pytest.raises(UpcastFailed, match="raised KeyError"):
        upcast("user.created", 1, {"email": "ada@example.com"}, 2)
