from typing import Any

import pytest

from tributary.contracts.validation import SchemaViolation, validate

from .samples import sample


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


def _mixed_keys(data: dict[str, Any], extra: dict[Any, Any]) -> dict[Any, Any]:
    """``data`` with keys JSON never has (a producer's bug: ints beside strings)."""
    mixed: dict[Any, Any] = dict(data)
    mixed.update(extra)
    return mixed


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("routing_key", "data", "rule"),
    [
        # jsonschema's error messages repr() the value: too deep for repr, too long for str(int)
        pytest.param(
            "email.send.v1",
            sample("email.send.v1", variables={"k": _nested(50_000)}),
            "unvalidatable",
            id="deep-nesting-in-a-value",
        ),
        pytest.param("email.send.v1", [_nested(50_000)], "unvalidatable", id="deep-nesting"),
        pytest.param(
            "email.send.v1",
            sample("email.send.v1", user_id=10**5000),
            "unvalidatable",
            id="int-too-long-to-print",
        ),
        pytest.param(
            "email.send.v1",
            sample("email.send.v1", variables={1: "x", "a": 2}),
            "type",
            id="non-string-key",
        ),
        pytest.param(
            "email.send.v1",
            _mixed_keys(sample("email.send.v1"), {1: "x", "nickname": "y"}),
            "additionalProperties",
            id="mixed-unknown-keys",
        ),
        pytest.param(
            "email.send.v1",
            sample("email.send.v1", subject="s" * 1_000_000),
            "maxLength",
            id="huge-string",
        ),
        pytest.param(
            "report.ready.v1",
            sample("report.ready.v1", url="http://" + "a" * 1_000_000),
            "maxLength",
            id="huge-uri",
        ),
        pytest.param(
            "email.send.v1",
            sample("email.send.v1", request_id="{" + "0" * 32 + "}"),
            "format",
            id="uuid-in-braces",
        ),
        pytest.param(
            "email.sent.v1",
            sample("email.sent.v1", message_id="<" + "a@" * 100 + ">"),
            "pattern",
            id="pattern-backtracking",
        ),
    ],
)
def test_any_data_is_a_violation_never_another_error(
    routing_key: str, data: Any, rule: str
) -> None:
    with pytest.raises(SchemaViolation) as err:
        validate(routing_key, data, "strict")
    assert err.value.rule == rule


def test_a_type_error_does_not_echo_the_value() -> None:
    with pytest.raises(SchemaViolation) as err:
        validate("user.created.v1", _user_created(name=["Augusta", "Ada"]), "tolerant")
    assert (err.value.field, err.value.rule) == ("data.name", "type")
    assert "Augusta" not in str(err.value)


@pytest.mark.parametrize("routing_key", ["user.created.v²", "user.created.v٢", "user.created.v02"])
def test_a_version_in_other_digits_is_an_unknown_type(routing_key: str) -> None:
    with pytest.raises(SchemaViolation, match="not a versioned routing key"):
        validate(routing_key, _user_created(), "tolerant")
