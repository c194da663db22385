"""The audit log's hash chain and signed checkpoints, as anyone outside the service checks them.

An entry's hash is the SHA-256 (hex) of the canonical JSON of its fields and the hash of the
entry before it. A checkpoint is an Ed25519 signature over ``{seq, head, signed_at}``: the
bytes signed are :data:`CHECKPOINT_DOMAIN` followed by that object's canonical JSON.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
"""The ``prev_hash`` of the first entry."""

CHECKPOINT_DOMAIN = b"tributary.audit.checkpoint.v1\n"


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 as is: the same bytes for the same content everywhere."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def instant(value: datetime) -> str:
    """An instant as the chain writes it: UTC with microseconds (naive values are UTC)."""
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hash_fields(fields: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of an entry's fields (``prev_hash`` included)."""
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


def checkpoint_message(seq: int, head: str, signed_at: datetime) -> bytes:
    """The bytes a checkpoint's signature covers."""
    body = {"seq": seq, "head": head, "signed_at": instant(signed_at)}
    return CHECKPOINT_DOMAIN + canonical_json(body).encode()


def b64(raw: bytes) -> str:
    """base64url without padding (keys and signatures in events and answers)."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(text: str) -> bytes:
    """The inverse of :func:`b64`; ValueError if ``text`` is not base64url."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def key_id(public_key: bytes) -> str:
    """The first 16 hex digits of the SHA-256 of a raw Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]
