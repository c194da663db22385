from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import Text
from sqlmodel import Field, SQLModel

from tributary.messaging.db import UtcDateTime, now


def _timestamp(*, nullable: bool = False) -> Any:
    return Field(default=None if nullable else ..., sa_type=UtcDateTime, nullable=nullable)


def normalize_email(email: str) -> str:
    """The form addresses are compared in: one mailbox, one account, whatever the case."""
    return email.strip().lower()


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: str = Field(primary_key=True, max_length=60)
    email: str = Field(max_length=254)
    email_normalized: str = Field(max_length=254, unique=True, index=True)
    name: str = Field(max_length=200)
    plan: str = Field(max_length=20)
    locale: str = Field(max_length=5)
    role: str = Field(default="member", max_length=20)
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp()

    @classmethod
    def register(cls, *, email: str, name: str, plan: str, locale: str) -> User:
        stamp = now()
        return cls(
            id=f"usr_{secrets.token_hex(10)}",
            email=email,
            email_normalized=normalize_email(email),
            name=name,
            plan=plan,
            locale=locale,
            created_at=stamp,
            updated_at=stamp,
        )


class SignUpKey(SQLModel, table=True):
    """An ``Idempotency-Key`` of ``POST /users``: a retry with it returns the user it made."""

    __tablename__ = "user_idempotency_keys"

    key: str = Field(primary_key=True, max_length=200)
    request_hash: str = Field(max_length=64)
    user_id: str = Field(foreign_key="users.id", max_length=60)
    created_at: datetime = _timestamp()


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=60)
    user_id: str = Field(foreign_key="users.id", max_length=60, index=True)
    name: str | None = Field(default=None, max_length=100)
    prefix: str = Field(max_length=20)
    """The secret's first characters, so its owner can tell keys apart in a listing."""
    secret_hash: str = Field(max_length=64, unique=True, index=True)
    created_at: datetime = _timestamp()
    revoked_at: datetime | None = _timestamp(nullable=True)

    @classmethod
    def issue(cls, user_id: str, name: str | None) -> tuple[ApiKey, str]:
        """A new key and its secret; the secret is returned here once and never stored."""
        secret = f"trib_{secrets.token_urlsafe(32)}"
        key = cls(
            id=f"key_{secrets.token_hex(10)}",
            user_id=user_id,
            name=name,
            prefix=secret[:9],
            secret_hash=hash_secret(secret),
            created_at=now(),
        )
        return key, secret


SECRET_FORMAT = re.compile(r"trib_[A-Za-z0-9_-]{43}")
"""What :meth:`ApiKey.issue` makes: ``trib_`` and 32 random bytes, base64url."""


def looks_like_secret(value: str) -> bool:
    return SECRET_FORMAT.fullmatch(value) is not None


def hash_secret(secret: str) -> str:
    # A plain SHA-256 is enough here, unlike for passwords: the secret carries 256 random bits,
    # so there is nothing to guess or look up in a dictionary, and a slow KDF (scrypt, PBKDF2)
    # would only make every authenticated request slower. Being deterministic, the hash can
    # also be found by an indexed look-up instead of testing each stored key in turn.
    return hashlib.sha256(secret.encode()).hexdigest()


class Subscription(SQLModel, table=True):
    """A paid plan a payment bought: ``active``, or ``cancelled`` (billing's
    ``subscription.cancelled``). A cancelled row that was never activated (``activated_at``
    empty) is a tombstone: billing cancelled the payment before identity saw it, so its late
    ``payment.succeeded`` activates nothing. One row per payment (the id derives from it)."""

    __tablename__ = "subscriptions"

    id: str = Field(primary_key=True, max_length=60)
    user_id: str = Field(foreign_key="users.id", max_length=60, index=True)
    plan: str = Field(max_length=20)
    payment_id: str = Field(max_length=60, unique=True)
    status: str = Field(default="active", max_length=20)
    activated_at: datetime | None = _timestamp(nullable=True)
    cancelled_at: datetime | None = _timestamp(nullable=True)

    @staticmethod
    def id_for_payment(payment_id: str) -> str:
        """Derived from the payment: a redelivered payment can only ever activate this one."""
        return f"sub_{hashlib.sha256(payment_id.encode()).hexdigest()[:20]}"


class SigningKey(SQLModel, table=True):
    """An Ed25519 key that signs access tokens; the newest unretired generation is the active one.

    ``generation`` is unique: of two replicas inserting the same generation at once only one
    wins; at start-up the other uses the winner's key instead of making a second one.
    """

    __tablename__ = "signing_keys"

    kid: str = Field(primary_key=True, max_length=64)
    """The RFC 7638 thumbprint of the public key: ``kid`` in every token header it signs."""
    generation: int = Field(unique=True)
    private_key_pem: str | None = Field(default=None, sa_type=Text, nullable=True)
    """PKCS#8 PEM; erased when the key is retired (it signs nothing any more)."""
    public_jwk: str = Field(sa_type=Text)
    """The JWK (JSON) published in the JWKS while the key is not retired."""
    created_at: datetime = _timestamp()
    activated_at: datetime = _timestamp()
    retired_at: datetime | None = _timestamp(nullable=True)
