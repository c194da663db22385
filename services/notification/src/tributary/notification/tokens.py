"""Unsubscribe tokens: signed, expiring, bound to one user and one category.

``u1.<payload>.<mac>``, both parts unpadded base64url: the payload is ``{user_id}:{category}:
{expires}`` (Unix seconds), the MAC an HMAC-SHA256 over a fixed domain prefix and the payload
with the service's unsubscribe key. Changing the user id, the category or the expiry breaks
the MAC; only the canonical encoding of a minted token is accepted (no second spelling of it).

The token is the whole credential of ``POST /unsubscribe``: it can only turn off the email of
the category it names, for the user it names, until it expires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from tributary.notification.preferences import CATEGORIES, Category, is_critical

DEVELOPMENT_UNSUBSCRIBE_KEY = b"tributary-development-unsubscribe-key"
"""Used when ``NOTIFICATION_UNSUBSCRIBE_KEY`` is not set (a warning is logged): never in
production, where anyone could mint links with it."""

VERSION = "u1"
_DOMAIN = b"tributary.notification.unsubscribe.v1\n"
_SHAPE = re.compile(r"u1\.([A-Za-z0-9_-]{1,200})\.([A-Za-z0-9_-]{43})")
_USER = re.compile(r"usr_[A-Za-z0-9]{8,40}")
_EXPIRY = re.compile(r"[0-9]{1,12}")
MAX_LENGTH = 300


class TokenRejected(Exception):
    """The token does not allow an unsubscribe; ``status`` and ``detail`` say why (no input)."""

    status = 400

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class MalformedToken(TokenRejected):
    status = 400


class ForgedToken(TokenRejected):
    status = 403


class ExpiredToken(TokenRejected):
    status = 410


class CriticalCategory(TokenRejected):
    status = 422


@dataclass(frozen=True)
class Unsubscribe:
    """What a valid token allows: turning off ``category`` email for ``user_id``."""

    user_id: str
    category: Category
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:  # another spelling of the same bytes was never minted
        raise ValueError("not the canonical encoding")
    return data


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _DOMAIN + payload, hashlib.sha256).digest()


def mint(user_id: str, category: Category, *, key: bytes, ttl_seconds: float) -> str:
    """A token allowing ``user_id`` to switch ``category`` email off for ``ttl_seconds``."""
    if not _USER.fullmatch(user_id) or category not in CATEGORIES:
        raise ValueError("a token needs a user id and a known category")
    expires = int(time.time() + ttl_seconds)
    payload = f"{user_id}:{category}:{expires}".encode("ascii")
    return f"{VERSION}.{_b64(payload)}.{_b64(_mac(key, payload))}"


def parse(token: str, *, key: bytes, now: float | None = None) -> Unsubscribe:
    """The unsubscribe ``token`` allows, or :class:`TokenRejected` (nothing else is raised)."""
    match = _SHAPE.fullmatch(token) if len(token) <= MAX_LENGTH else None
    if match is None:
        raise MalformedToken("the unsubscribe link is malformed (incomplete or changed)")
    try:
        payload = _unb64(match.group(1))
        mac = _unb64(match.group(2))
    except (ValueError, binascii.Error):
        raise MalformedToken("the unsubscribe link is malformed (incomplete or changed)") from None
    if not hmac.compare_digest(mac, _mac(key, payload)):
        raise ForgedToken("the unsubscribe link is not valid: it was not issued by this service")
    # signed by us: the payload is one we minted, but stay strict all the same
    parts = payload.decode("ascii", errors="replace").split(":")
    if (
        len(parts) != 3
        or not _USER.fullmatch(parts[0])
        or parts[1] not in CATEGORIES
        or not _EXPIRY.fullmatch(parts[2])
    ):
        raise MalformedToken("the unsubscribe link is malformed (incomplete or changed)")
    user_id, category, expires = parts[0], parts[1], int(parts[2])
    if expires < (time.time() if now is None else now):
        raise ExpiredToken(
            "the unsubscribe link has expired; change your notification preferences instead"
        )
    for known in CATEGORIES:  # narrows the type without a cast
        if known == category:
            if is_critical(known, "email"):  # none is now; kept should one ever be
                raise CriticalCategory(
                    f"{known} notifications are critical: their email cannot be switched off"
                )
            return Unsubscribe(user_id=user_id, category=known, expires=expires)
    raise MalformedToken("the unsubscribe link is malformed (incomplete or changed)")
