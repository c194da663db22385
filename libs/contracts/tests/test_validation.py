from typing import Any

import pytest

from tributary.contracts.validation import SchemaViolation, validate


def _user_created(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "user_id": "usr_0123456789",
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "plan": "free",
        "locale": "en-GB",
        "created_at": "2026-01-01T00:00:00Z",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def test_a_valid_payload_passes_both_modes() -> None:
    validate("user.created.v1", _user_created(), "strict")
    validate("user.created.v1", _user_created(), "tolerant")


def test_producers_reject_unknown_fields_and_consumers_ignore_them() -> None:
    payload = _user_created(nickname="ada")
    with pytest.raises(SchemaViolation) as err:
        validate("user.created.v1", payload, "strict")
    assert err.value.field == "data.nickname"
    assert err.value.rule == "additionalProperties"
    validate("user.created.v1", payload, "tolerant")


@pytest.mark.parametrize(
    ("overrides", "field", "rule"),
    [
        pytest.param({"email": None}, "data.email", "required", id="missing"),
        pytest.param({"email": "not-an-email"}, "data.email", "format", id="format-email"),
        pytest.param({"created_at": "yesterday"}, "data.created_at", "format", id="format-time"),
        pytest.param({"plan": "platinum"}, "data.plan", "enum", id="enum"),
        pytest.param({"locale": "english"}, "data.locale", "pattern", id="pattern"),
        pytest.param({"name": "x" * 201}, "data.name", "maxLength", id="max-length"),
        pytest.param({"plan": 3}, "data.plan", "type", id="type"),
    ],
)
def test_errors_name_the_field_and_the_rule(
    overrides: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(SchemaViolation) as err:
        validate("user.created.v1", _user_created(**overrides), "tolerant")
    assert (err.value.field, err.value.rule) == (field, rule)


def test_errors_do_not_echo_the_offending_value() -> None:
    with pytest.raises(SchemaViolation) as err:
        validate("user.created.v1", _user_created(email="ada-at-example.com"), "strict")
    assert "ada-at-example.com" not in str(err.value)


def test_an_unknown_type_is_a_violation() -> None:
    with pytest.raises(SchemaViolation, match="unknown event type"):
        validate("user.deleted.v1", {}, "tolerant")
