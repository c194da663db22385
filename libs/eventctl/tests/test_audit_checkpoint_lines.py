"""Parsing the lines of an ``eventctl audit verify --checkpoints`` file: foreign input."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tributary.eventctl.audit import CHECKPOINT_TYPE, CheckpointFileError, parse_checkpoint_line

GOOD = {
    "seq": 7,
    "head": "ab" * 32,
    "signed_at": "2026-01-09T12:00:00Z",
    "key_id": "0123456789abcdef",
    "public_key": "A" * 43,
    "signature": "B" * 86,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def parsed_or_clear_error(line: str) -> None:
    message = "line 3: "
    try:
        parse_checkpoint_line(line, 3)
    except CheckpointFileError as exc:
        message = str(exc)
    assert message.startswith("line 3: ")


@given(st.text())
def test_arbitrary_text_is_a_checkpoint_none_or_a_clear_error(line: str) -> None:
    parsed_or_clear_error(line)


@given(json_values)
def test_arbitrary_json_is_a_checkpoint_none_or_a_clear_error(value: Any) -> None:
    parsed_or_clear_error(json.dumps(value))


@given(st.dictionaries(st.sampled_from(sorted(GOOD)), json_values))
def test_arbitrary_checkpoint_data_is_parsed_or_a_clear_error(data: dict[str, Any]) -> None:
    line = json.dumps({"type": CHECKPOINT_TYPE, "data": {**GOOD, **data}})
    parsed_or_clear_error(line)
    archived = json.dumps({"body_base64": base64.b64encode(line.encode()).decode()})
    parsed_or_clear_error(archived)


@given(st.binary())
def test_an_arbitrary_archived_body_is_a_checkpoint_none_or_a_clear_error(body: bytes) -> None:
    parsed_or_clear_error(json.dumps({"body_base64": base64.b64encode(body).decode()}))


def test_a_checkpoint_an_other_event_and_blank_lines() -> None:
    line = json.dumps({"type": CHECKPOINT_TYPE, "data": GOOD})
    checkpoint = parse_checkpoint_line(line)
    assert checkpoint is not None
    assert checkpoint.seq == 7
    assert parse_checkpoint_line(json.dumps({"type": "com.tributary.user.erased.v1"})) is None
    assert parse_checkpoint_line("  \n") is None
