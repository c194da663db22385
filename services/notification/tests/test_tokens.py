"""Unsubscribe tokens: what they allow, what they refuse, and that nothing else parses."""

from __future__ import annotations

import base64
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tributary.notification import tokens
from tributary.notification.preferences import CATEGORIES
from tributary.notification.tokens import (
    ExpiredToken,
    ForgedToken,
    MalformedToken,
    TokenRejected,
)

KEY = b"k" * 32
USER = "usr_ada000000001"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def with_payload(token: str, payload: str) -> str:
    """``token`` with its payload replaced and its signature kept."""
    version, _, mac = token.split(".")
    return f"{version}.{b64(payload.encode())}.{mac}"


def changed_signature(token: str) -> str:
    """``token`` with one character in the middle of its MAC changed."""
    middle = len(token) - 20
    replacement = "B" if token[middle] == "A" else "A"
    return token[:middle] + replacement + token[middle + 1 :]


def test_a_minted_token_allows_its_user_and_category_until_it_expires() -> None:
    token = tokens.mint(USER, "mentions", key=KEY, ttl_seconds=60)
    allowed = tokens.parse(token, key=KEY)
    assert (allowed.user_id, allowed.category) == (USER, "mentions")
    assert allowed.expires == pytest.approx(time.time() + 60, abs=2)
    assert len(f"https://notify.example.com/unsubscribe?token={token}") < 200
    with pytest.raises(ExpiredToken):
        tokens.parse(token, key=KEY, now=time.time() + 61)
    for category in CATEGORIES:  # account's email can be switched off too
        assert tokens.parse(tokens.mint(USER, category, key=KEY, ttl_seconds=60), key=KEY)


def test_another_user_category_or_expiry_under_the_same_signature_is_forged() -> None:
    token = tokens.mint(USER, "mentions", key=KEY, ttl_seconds=60)
    expires = tokens.parse(token, key=KEY).expires
    for payload in (
        f"usr_eve000000001:mentions:{expires}",
        f"{USER}:reports:{expires}",
        f"{USER}:mentions:{expires + 3600}",
    ):
        with pytest.raises(ForgedToken) as refused:
            tokens.parse(with_payload(token, payload), key=KEY)
        assert refused.value.status == 403
    with pytest.raises(ForgedToken):
        tokens.parse(token, key=b"another key")


def test_refusals_say_why_with_their_own_status() -> None:
    expired = tokens.mint(USER, "reports", key=KEY, ttl_seconds=-1)
    billing = tokens.mint(USER, "billing", key=KEY, ttl_seconds=60)
    cases: list[tuple[str, type[TokenRejected], int]] = [
        ("", MalformedToken, 400),
        ("u1.abc", MalformedToken, 400),
        (expired, ExpiredToken, 410),
        (changed_signature(billing), ForgedToken, 403),
    ]
    for token, kind, status in cases:
        with pytest.raises(kind) as refused:
            tokens.parse(token, key=KEY)
        assert refused.value.status == status
        assert USER not in refused.value.detail


def test_a_second_spelling_of_a_minted_token_is_not_accepted() -> None:
    token = tokens.mint(USER, "mentions", key=KEY, ttl_seconds=60)
    version, payload, mac = token.split(".")
    # the last base64 character carries unused low bits: flipping them keeps the bytes
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(mac[-1])
    twin = f"{version}.{payload}.{mac[:-1]}{alphabet[last ^ 1]}"
    assert base64.urlsafe_b64decode(twin.split(".")[2] + "=") == base64.urlsafe_b64decode(mac + "=")
    with pytest.raises(MalformedToken):
        tokens.parse(twin, key=KEY)


MINTED = tokens.mint(USER, "mentions", key=KEY, ttl_seconds=3600)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=400),
        st.from_regex(r"u1\.[A-Za-z0-9_-]{1,200}\.[A-Za-z0-9_-]{43}", fullmatch=True),
        st.builds(
            lambda i, c: MINTED[:i] + c + MINTED[i + 1 :],
            st.integers(0, len(MINTED) - 1),
            st.characters(),
        ),
        st.builds(
            lambda p: with_payload(MINTED, p),
            st.text(alphabet=st.characters(codec="ascii"), max_size=80),
        ),
    )
)
@example(MINTED + "=")
@example(MINTED.replace(".", "..", 1))
def test_no_string_parses_unless_minted_and_none_raises_anything_else(token: str) -> None:
    try:
        allowed = tokens.parse(token, key=KEY)
    except TokenRejected as refused:
        status = refused.status
    else:
        status = 200
        assert token == MINTED
        assert (allowed.user_id, allowed.category) == (USER, "mentions")
    assert status == 200 or 400 <= status < 500
