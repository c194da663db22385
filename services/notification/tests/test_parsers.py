"""The other foreign input the API reads: list cursors and Last-Event-ID."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tributary.notification.preferences import CATEGORIES, CHANNELS, decide
from tributary.notification.schemas import MAX_SEQ, make_cursor, parse_cursor
from tributary.notification.stream import parse_last_event_id


@given(st.integers(1, MAX_SEQ))
def test_a_cursor_stands_for_its_position(position: int) -> None:
    assert parse_cursor(make_cursor(position)) == position


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=60), st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)))
def test_any_other_text_is_no_cursor_and_raises_nothing_else(text: str) -> None:
    try:
        position = parse_cursor(text)
    except ValueError:
        return
    assert 1 <= position <= MAX_SEQ
    assert make_cursor(position) == text  # only what this service issues


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_last_event_id_is_ascii_digits_in_range_or_refused(text: str) -> None:
    try:
        number = parse_last_event_id(text)
    except ValueError:
        return
    assert 0 <= number <= MAX_SEQ
    assert text.strip(" ").isascii()
    assert str(number) == text.strip(" ").lstrip("0") or number == 0


def test_precedence_is_critical_then_the_users_choice_then_the_default() -> None:
    for category in CATEGORIES:
        for channel in CHANNELS:
            critical = (category, channel) == ("account", "in_app")
            default = (category, channel) != ("billing", "email")
            off = {(category, channel): False}
            on = {(category, channel): True}
            assert decide(category, channel, {}) == (
                (True, "critical") if critical else (default, "default")
            )
            assert decide(category, channel, off) == (
                (True, "critical") if critical else (False, "user")
            )
            assert decide(category, channel, on) == (True, "critical" if critical else "user")
