"""The ordering extensions ``partitionkey`` and ``sequence``: written by producers, foreign input
to consumers (a malformed value makes the event malformed, never anything else)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.envelope import MAX_ID_LENGTH, MalformedEvent, new_event, parse_event

from .samples import SAMPLES

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_CHARACTER = st.characters(exclude_categories=())  # surrogates and controls included
values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(ANY_CHARACTER, max_size=40)
    | st.from_regex(r"[0-9]{1,25}", fullmatch=True)
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)


def _body(**extensions: Any) -> bytes:
    envelope = {
        "specversion": "1.0",
        "id": "evt-1",
        "type": f"{NAMESPACE}.user.created.v2",
        "source": "/services/identity",
        "time": "2026-01-01T00:00:00Z",
        "subject": "users/usr_1",
        "data": dict(SAMPLES["user.created.v2"]),
        **extensions,
    }
    return json.dumps(envelope).encode()


def test_a_producer_sets_both_extensions_and_a_consumer_reads_them() -> None:
    event = new_event(
        routing_key="user.created.v2",
        source="/services/identity",
        data=dict(SAMPLES["user.created.v2"]),
        partitionkey="usr_1",
        sequence=42,
    )
    assert event.to_dict()["partitionkey"] == "usr_1"
    assert event.to_dict()["sequence"] == "42"  # CloudEvents: a String
    parsed = parse_event(event.to_bytes())
    assert (parsed.partitionkey, parsed.sequence) == ("usr_1", 42)


def test_without_them_both_are_none() -> None:
    parsed = parse_event(_body())
    assert (parsed.partitionkey, parsed.sequence) == (None, None)


@pytest.mark.parametrize(
    ("extensions", "complaint"),
    [
        ({"sequence": 7}, "sequence must be a decimal string"),
        ({"sequence": "-1"}, "sequence must be a decimal string"),
        ({"sequence": "007"}, "sequence must be a decimal string"),
        ({"sequence": "1" * 19}, "sequence must be a decimal string"),
        ({"sequence": "\u0663"}, "sequence must be a decimal string"),  # an Arabic-Indic 3
        ({"sequence": ""}, "sequence must be a decimal string"),
        ({"partitionkey": ""}, "partitionkey must be a string"),
        ({"partitionkey": 5}, "partitionkey must be a string"),
        ({"partitionkey": "x" * (MAX_ID_LENGTH + 1)}, "partitionkey must be a string"),
        ({"partitionkey": "a\x00b"}, "control character"),
    ],
)
def test_malformed_extensions_make_a_malformed_event(
    extensions: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(MalformedEvent, match=complaint):
        parse_event(_body(**extensions))


@pytest.mark.parametrize(
    "arguments",
    [
        {"sequence": -1},
        {"sequence": 10**18},
        {"sequence": True},
        {"partitionkey": ""},
        {"partitionkey": "\n"},
        {"partitionkey": "x" * (MAX_ID_LENGTH + 1)},
    ],
)
def test_a_producer_cannot_write_a_malformed_extension(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"partition key|sequence"):
        new_event(routing_key="user.created.v2", source="/s", data={}, **arguments)


@FUZZ
@given(sequence=values, partitionkey=values)
def test_any_extension_value_parses_or_is_malformed(sequence: Any, partitionkey: Any) -> None:
    extensions = {
        name: value
        for name, value in (("sequence", sequence), ("partitionkey", partitionkey))
        if value is not None
    }
    try:
        body = _body(**extensions)
    except ValueError:  # json.dumps of a lone surrogate is fine; NaN is not JSON we send
        return
    try:
        event = parse_event(body)
    except MalformedEvent:
        return
    if "sequence" in extensions:
        assert event.sequence is not None
        assert 0 <= event.sequence < 10**18
        assert str(event.sequence) == extensions["sequence"]
    if "partitionkey" in extensions:
        key = event.partitionkey
        assert key is not None
        assert key == extensions["partitionkey"]
        assert 0 < len(key) <= MAX_ID_LENGTH
        key.encode()  # UTF-8, so it hashes to a slot
