"""The flat fast path decides exactly as the tolerant JSON Schema validator does."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tributary.contracts.catalog import catalog
from tributary.contracts.validation import (
    Mode,
    SchemaViolation,
    flat_check,
    validate,
    validator_for,
)

from .samples import sample

FLAT = sorted(v.routing_key for v in catalog().versions() if flat_check(v.routing_key))
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PER_TYPE = settings(FUZZ, max_examples=50)  # 21 types, two modes

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
# characters where regex engines, format checkers and pydantic's lax parsing tend to differ
_tricky = st.sampled_from(
    ["\n", " ", "\t", "\x1c", "\u00a0", "\u2028", "@", "Z", "z", "T", "t", "+", "-", ":", ".", "0"]
)


def _near(value: Any) -> st.SearchStrategy[Any]:
    """Values close to a valid one: edited strings, numbers around it, other JSON types."""
    if isinstance(value, str):
        edits = st.tuples(
            st.integers(0, len(value)), st.integers(0, 3), _tricky | st.text(max_size=3)
        )
        return st.one_of(
            edits.map(lambda e: value[: e[0]] + e[2] + value[e[0] + e[1] :]),
            st.just(value.upper()),
            st.just(value * 60),
            st.just(""),
        )
    if isinstance(value, bool):
        return st.sampled_from([0, 1, "true", None])
    if isinstance(value, int):
        return st.sampled_from(
            [value - 1, -1, 0, float(value), value + 0.5, str(value), 2**31, 2**63, True]
        )
    return _json


@st.composite
def payloads(draw: st.DrawFn, routing_key: str) -> dict[str, Any]:
    """The sample of ``routing_key`` with some fields removed, edited or replaced."""
    data = sample(routing_key)
    for name in list(data):
        change = draw(st.sampled_from(["keep", "keep", "keep", "drop", "near", "near", "any"]))
        if change == "drop":
            del data[name]
        elif change == "near":
            data[name] = draw(_near(data[name]))
        elif change == "any":
            data[name] = draw(_json)
    if draw(st.booleans()):
        data[draw(st.text(max_size=8))] = draw(_json)  # unknown fields are ignored
    return data


def _schema(routing_key: str, mode: Mode = "tolerant") -> Any:
    """The jsonschema validation of ``routing_key`` as a check."""
    return lambda data: validate(routing_key, data, mode)


def _verdict(check: Any, data: Any) -> tuple[str, str] | None:
    try:
        check(data)
    except SchemaViolation as exc:
        return (exc.field, exc.rule)
    return None


@pytest.mark.parametrize("mode", ["tolerant", "strict"])
@pytest.mark.parametrize("routing_key", FLAT)
@PER_TYPE
@given(data=st.data())
def test_the_flat_check_decides_as_the_schema_validator(
    routing_key: str, mode: Mode, data: Any
) -> None:
    payload = data.draw(payloads(routing_key))
    expected = _verdict(_schema(routing_key, mode), payload)
    actual = _verdict(flat_check(routing_key, mode), payload)
    if expected is not None and expected[1] == "unvalidatable":
        assert actual is not None  # jsonschema could not print its message; still refused
    else:
        assert actual == expected, payload


@FUZZ
@given(_json)
def test_any_json_value_as_the_payload_gets_the_same_verdict(value: Any) -> None:
    for routing_key in ("user.created.v2", "payment.failed.v1"):
        for mode in ("tolerant", "strict"):
            expected = _verdict(_schema(routing_key, mode), value)
            actual = _verdict(flat_check(routing_key, mode), value)
            assert (actual is None) == (expected is None)


def test_strict_mode_names_the_first_unknown_property_before_a_missing_one() -> None:
    payload = {**sample("user.created.v2"), "zeta": 1, "alpha": 2}
    del payload["email"]
    expected = _verdict(_schema("user.created.v2", "strict"), payload)
    assert expected == ("data.alpha", "additionalProperties")
    assert _verdict(flat_check("user.created.v2", "strict"), payload) == expected
    assert _verdict(flat_check("user.created.v2"), payload) == ("data.email", "required")


@pytest.mark.parametrize(
    ("overrides", "field", "rule"),
    [
        pytest.param({"email": "not-an-email"}, "data.email", "format", id="format-email"),
        pytest.param({"created_at": 1767225600}, "data.created_at", "type", id="time-as-number"),
        pytest.param({"created_at": "2026-01-01"}, "data.created_at", "format", id="date-only"),
        pytest.param({"plan": None}, "data.plan", "type", id="null"),
        pytest.param({"plan": "gold"}, "data.plan", "enum", id="enum"),
        pytest.param({"given_name": ""}, "data.given_name", "minLength", id="min-length"),
        pytest.param({"locale": "en-GB\u2028"}, "data.locale", "pattern", id="line-separator"),
    ],
)
def test_what_the_typed_model_alone_would_let_through_is_refused(
    overrides: dict[str, Any], field: str, rule: str
) -> None:
    payload = {**sample("user.created.v2"), **overrides}
    check = flat_check("user.created.v2")
    assert check is not None
    assert _verdict(check, payload) == _verdict(_schema("user.created.v2"), payload)
    assert _verdict(check, payload) == (field, rule)


def test_a_trailing_newline_passes_the_schema_as_there_and_the_model_refuses_it() -> None:
    payload = sample("user.created.v2", user_id="usr_0123456789\n")
    check = flat_check("user.created.v2")
    assert check is not None
    check(payload)  # Python's `$` matches before a final newline, in jsonschema as here
    validate("user.created.v2", payload, "tolerant")


def test_bounds_follow_the_schema_validator() -> None:
    for amount in (0, 1, 1.0, 0.5, -math.inf, 2**80, True, "1"):
        payload = sample("payment.failed.v1", amount=amount)
        expected = _verdict(_schema("payment.failed.v1"), payload)
        assert _verdict(flat_check("payment.failed.v1"), payload) == expected, amount


def test_a_nested_schema_has_no_flat_check() -> None:
    assert flat_check("email.send.v1") is None
    assert flat_check("email.send.v1", "strict") is None
    assert "user.created.v2" in FLAT


def test_the_check_and_the_validator_are_built_once() -> None:
    assert flat_check("user.created.v2") is flat_check("user.created.v2")
    assert flat_check("user.created.v2", "strict") is flat_check("user.created.v2", "strict")
    assert validator_for("user.created.v2", "tolerant") is validator_for(
        "user.created.v2", "tolerant"
    )


def test_the_flat_check_costs_a_fraction_of_the_schema_validator() -> None:
    payload = sample("user.created.v2")
    check = flat_check("user.created.v2")
    assert check is not None

    def cost(fn: Any) -> float:
        fn(payload)
        start = time.process_time()
        for _ in range(500):
            fn(payload)
        return time.process_time() - start

    full = min(cost(_schema("user.created.v2")) for _ in range(3))
    fast = min(cost(check) for _ in range(3))
    assert fast < full / 2, (fast, full)
