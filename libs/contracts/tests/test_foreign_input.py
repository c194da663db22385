"""Foreign input: whatever arrives, each entry point raises only its documented exception.

``parse_event`` → :class:`MalformedEvent`, ``by_ce_type`` → :class:`CatalogError`, ``validate`` →
:class:`SchemaViolation`, ``upcast`` → :class:`UpcastFailed` (or :class:`NoUpcastPath`). What is
accepted must be safe for the runtime to store and hash, so the properties check that too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tributary.contracts import upcasting
from tributary.contracts.catalog import NAMESPACE, CatalogError, catalog
from tributary.contracts.envelope import MAX_ID_LENGTH, CloudEvent, MalformedEvent, parse_event
from tributary.contracts.upcasting import Upcaster, UpcastFailed, upcast
from tributary.contracts.validation import SchemaViolation, validate

from .samples import SAMPLES

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ROUTING_KEYS = sorted(SAMPLES)
ANY_CHARACTER = st.characters(exclude_categories=())  # surrogates and controls included
texts = st.text(ANY_CHARACTER, max_size=60)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | texts
)
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=25,
)


def valid_envelope(routing_key: str = "user.created.v2") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "evt-1",
        "type": f"{NAMESPACE}.{routing_key}",
        "source": "/external/fuzz",
        "time": "2026-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "data": dict(SAMPLES[routing_key]),
    }


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid envelope with some attributes replaced, removed or added (extensions)."""
    event = valid_envelope(draw(st.sampled_from(ROUTING_KEYS)))
    for name in draw(st.lists(st.sampled_from(sorted(event)), max_size=3, unique=True)):
        if draw(st.booleans()):
            event[name] = draw(json_values)
        else:
            del event[name]
    extension_names = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True) | texts
    for _ in range(draw(st.integers(0, 3))):
        event[draw(extension_names)] = draw(json_values)
    return event


def assert_safe_to_store(event: CloudEvent[dict[str, Any]]) -> None:
    """What the consumer does with an accepted event (hash, inbox row, time) cannot fail."""
    json.dumps(event.data, sort_keys=True, ensure_ascii=False).encode()
    again = parse_event(event.to_bytes())  # a DLQ copy or a replay reads the same event
    assert (again.id, again.type, again.data) == (event.id, event.type, event.data)
    assert len(event.inbox_key) <= 2 * MAX_ID_LENGTH + 1
    for value in (event.id, event.type, event.source, event.idempotencykey or ""):
        assert not any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in value)
    event.time.astimezone(UTC)
    event.time.timestamp()


def parse_or_malformed(body: bytes | str) -> None:
    """An event safe to store, or :class:`MalformedEvent` with a reason; nothing else."""
    reason = "accepted"
    try:
        assert_safe_to_store(parse_event(body))
    except MalformedEvent as exc:
        reason = str(exc)
    assert reason


# -- parse_event --------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_are_malformed(body: bytes) -> None:
    parse_or_malformed(body)


@FUZZ
@given(st.text(ANY_CHARACTER, max_size=500))
def test_any_text_parses_or_is_malformed(body: str) -> None:
    parse_or_malformed(body)


@FUZZ
@given(json_values, st.booleans())
def test_any_json_parses_or_is_malformed(value: Any, ascii_only: bool) -> None:
    parse_or_malformed(json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


@FUZZ
@given(envelopes(), st.booleans())
def test_any_envelope_parses_or_is_malformed(event: dict[str, Any], ascii_only: bool) -> None:
    body = json.dumps(event, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    parse_or_malformed(body)


@FUZZ
@given(st.integers(min_value=1, max_value=5000), st.sampled_from(["[", "{", '{"a":']))
def test_any_nesting_depth_parses_or_is_malformed(depth: int, opener: str) -> None:
    closer = {"[": "]", "{": "}", '{"a":': "}"}[opener]
    inner = "1" if opener == '{"a":' else ""
    envelope = json.dumps(valid_envelope())[:-1]  # room for one more attribute
    parse_or_malformed(f'{envelope},"deep":{opener * depth}{inner}{closer * depth}}}')


# -- catalog ------------------------------------------------------------------------------------

digits = st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=6)
ce_types = (
    texts
    | st.builds(lambda rest: f"{NAMESPACE}.{rest}", texts)
    | st.builds(lambda v: f"{NAMESPACE}.user.created.v{v}", digits | texts)
    | st.builds(
        lambda name, v: f"{NAMESPACE}.{name}.v{v}",
        st.sampled_from(sorted({key.rsplit(".v", 1)[0] for key in ROUTING_KEYS})),
        digits | st.integers(-10, 10**30).map(str),
    )
)


@FUZZ
@given(ce_types)
def test_any_type_is_a_catalog_version_or_a_catalog_error(ce_type: str) -> None:
    try:
        spec = catalog().by_ce_type(ce_type)
    except CatalogError:
        return
    assert spec.ce_type == ce_type  # only the canonical spelling is accepted


# -- validate -----------------------------------------------------------------------------------

MARK = "\u2042pii-"  # a prefix no schema, rule or key contains


@st.composite
def payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[str]]:
    """A sample payload with some fields replaced by arbitrary values; the marked strings."""
    routing_key = draw(st.sampled_from(ROUTING_KEYS))
    data = dict(SAMPLES[routing_key])
    marked: list[str] = []
    for name in list(data):
        choice = draw(st.integers(0, 3))
        if choice == 1:
            data[name] = draw(json_values)
        elif choice == 2:
            value = MARK + draw(st.text(max_size=30))
            data[name] = draw(st.sampled_from([value, [value], {"k": value}]))
            marked.append(value)
    if draw(st.booleans()):
        data[draw(texts)] = draw(json_values)
    return routing_key, data, marked


@FUZZ
@given(payloads(), st.sampled_from(["strict", "tolerant"]))
def test_any_payload_is_valid_or_a_violation_that_does_not_echo_values(
    case: tuple[str, dict[str, Any], list[str]], mode: Any
) -> None:
    routing_key, data, marked = case
    said = ""
    try:
        validate(routing_key, data, mode)
    except SchemaViolation as exc:
        said = str(exc)
    assert not [value for value in marked if value in said]


@FUZZ
@given(st.sampled_from(ROUTING_KEYS), json_values | st.sampled_from([b"x", {1, 2}, object()]))
def test_any_value_as_a_whole_payload_is_valid_or_a_violation(routing_key: str, data: Any) -> None:
    with suppress(SchemaViolation):
        validate(routing_key, data, "tolerant")


@FUZZ
@given(ce_types.map(lambda t: t.removeprefix(f"{NAMESPACE}.")))
def test_any_routing_key_is_validated_or_a_violation(routing_key: str) -> None:
    with suppress(SchemaViolation):
        validate(routing_key, {}, "tolerant")


# -- upcast -------------------------------------------------------------------------------------

TEST_TYPE = "test.probe"


class OddError(Exception):
    """An exception type nobody expects."""


@contextmanager
def registered(
    fn: Upcaster, *, type_name: str = TEST_TYPE, from_version: int = 1
) -> Iterator[None]:
    """``fn`` as the upcaster of ``type_name`` ``from_version`` for the duration."""
    key = (type_name, from_version)
    previous = upcasting._UPCASTERS.get(key)
    upcasting._UPCASTERS[key] = fn
    try:
        yield
    finally:
        if previous is None:
            del upcasting._UPCASTERS[key]
        else:
            upcasting._UPCASTERS[key] = previous


RAISED = [KeyError, ValueError, TypeError, AttributeError, ZeroDivisionError, RecursionError]


@FUZZ
@given(
    st.dictionaries(texts, json_values, max_size=5),
    st.sampled_from([*RAISED, OddError, UnicodeDecodeError]),
)
def test_an_upcaster_raising_anything_is_an_upcast_failure(
    data: dict[str, Any], raised: type[Exception]
) -> None:
    def broken(payload: dict[str, Any]) -> dict[str, Any]:
        if raised is UnicodeDecodeError:
            b"\xff".decode()
        raise raised("upcaster bug")

    with registered(broken), pytest.raises(UpcastFailed) as failed:
        upcast(TEST_TYPE, 1, data, 2)
    assert isinstance(failed.value.__cause__, raised)
    assert raised.__name__ in str(failed.value)


@FUZZ
@given(st.dictionaries(texts, json_values, max_size=5), json_values)
def test_an_upcaster_returning_anything_but_an_object_is_an_upcast_failure(
    data: dict[str, Any], returned: Any
) -> None:
    def odd(payload: dict[str, Any]) -> Any:
        return returned

    with registered(odd):
        if isinstance(returned, dict):
            assert upcast(TEST_TYPE, 1, data, 2) is returned
        else:
            with pytest.raises(UpcastFailed, match="returned"):
                upcast(TEST_TYPE, 1, data, 2)


@FUZZ
@given(st.dictionaries(texts, json_values, max_size=6))
def test_the_user_created_upcaster_on_any_payload_succeeds_or_fails_as_upcast_failed(
    data: dict[str, Any],
) -> None:
    cause: BaseException | None = None
    try:
        upcast("user.created", 1, data, 2)
    except UpcastFailed as exc:
        cause = exc.__cause__
    assert cause is None or isinstance(cause, KeyError)  # only a missing name breaks it
