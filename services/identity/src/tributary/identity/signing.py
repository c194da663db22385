"""Token signing keys: Ed25519, kept in identity's database, rotated on request, published.

One key is active at a time: the unretired key of the highest ``generation`` whose
``activated_at`` has come; every token is signed with it (read from the database per token, so
a rotation made by another replica takes effect everywhere). A rotation adds a generation that
is published at once but signs only :data:`ACTIVATION_LEAD` later: by then every service has
had the chance to fetch it (a service refetches the JWKS at most every
``JWKS_MIN_INTERVAL`` seconds, and HTTP caches keep it ``JWKS_MAX_AGE``), so no token names a
key its verifier cannot know yet. The key it supersedes signs nothing more from then on but
stays in the JWKS until every token it signed has expired (token lifetime plus the verifiers'
clock leeway); then, the next time the keys are listed, it is retired and its private half
erased.

:class:`SigningKeys` is also identity's ``KeySource``: identity verifies its own tokens with
the keys in its database, without an HTTP call to itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.identity.inserts import insert_or_ignore
from tributary.identity.models import SigningKey
from tributary.identity.rates import WRITES
from tributary.messaging.db import now
from tributary.service.auth import (
    JWKS_MIN_INTERVAL,
    JWKS_PATH,
    KeysUnavailable,
    public,
    require,
)

log = logging.getLogger("tributary.identity.signing")

Clock = Callable[[], datetime]
JWKS_MAX_AGE = 10
"""Seconds a JWKS answer may be cached by its readers and by HTTP caches."""
ACTIVATION_LEAD = timedelta(seconds=JWKS_MIN_INTERVAL + JWKS_MAX_AGE)
"""How long a new key is published before it signs."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The JWK of ``public_key``, with its RFC 7638 thumbprint as ``kid``."""
    x = _b64url(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    members = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    kid = _b64url(hashlib.sha256(members.encode()).digest())
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}


def new_signing_key(generation: int, stamp: datetime, activates: datetime) -> SigningKey:
    private_key = Ed25519PrivateKey.generate()
    jwk = public_jwk(private_key.public_key())
    pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return SigningKey(
        kid=jwk["kid"],
        generation=generation,
        private_key_pem=pem.decode("ascii"),
        public_jwk=json.dumps(jwk),
        created_at=stamp,
        activated_at=activates,
    )


@dataclass(frozen=True)
class ActiveKey:
    kid: str
    private_key: Ed25519PrivateKey


class SigningKeys:
    """The signing keys in the database, and the JWKS built from them (cached in memory).

    ``published_for``: how long a superseded key stays published (token lifetime + leeway).
    ``lead``: how long a rotated-in key is published before it signs.
    ``clock`` dates the keys and decides retirements (tests move it forward).
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        published_for: timedelta,
        lead: timedelta = ACTIVATION_LEAD,
        clock: Clock = now,
        max_age: float = 30.0,
        min_interval: float = 1.0,
    ) -> None:
        self.sessions = sessions
        self.published_for = published_for
        self.lead = lead
        self.clock = clock
        self.max_age = max_age
        """Seconds the cached JWKS is served before the database is read again."""
        self.min_interval = min_interval
        """At most one database read per this many seconds, even when asked to refresh."""
        self._private: dict[str, Ed25519PrivateKey] = {}
        self._jwks: dict[str, Any] | None = None
        self._read_at = -math.inf
        self._lock = asyncio.Lock()

    # -- the active key ------------------------------------------------------------------

    async def ensure_active(self) -> SigningKey:
        """The active key; the first one is made if there is none (once, whoever races)."""
        for _ in range(5):
            newest = await self._newest()
            if newest is not None and newest.retired_at is None:
                return newest
            made = await self._insert(newest.generation + 1 if newest else 1)
            if made is not None:
                log.info("signing key %s created (generation %d)", made.kid, made.generation)
                return made
            # another replica inserted that generation first: it is read on the next turn
        raise RuntimeError("no active signing key could be created")

    async def rotate(self) -> tuple[SigningKey, SigningKey | None]:
        """A new key, signing from ``lead`` on, and the one it supersedes then (published
        until its tokens expire)."""
        for _ in range(5):
            newest = await self._newest()
            made = await self._insert(newest.generation + 1 if newest else 1, lead=self.lead)
            if made is not None:
                self._read_at = -math.inf  # publish it at once
                previous = newest if newest is not None and newest.retired_at is None else None
                log.info(
                    "signing key %s published, signing from %s (generation %d), superseding %s",
                    made.kid,
                    made.activated_at.isoformat(),
                    made.generation,
                    previous.kid if previous else "none",
                )
                return made, previous
            # a concurrent rotation took that generation: rotate past it
        raise RuntimeError("the signing key could not be rotated")

    async def _newest(self) -> SigningKey | None:
        """The key of the highest generation, retired or not (one statement: one snapshot)."""
        async with self.sessions() as session:
            query = select(SigningKey).order_by(col(SigningKey.generation).desc()).limit(1)
            return (await session.exec(query)).first()

    async def _insert(
        self, generation: int, *, lead: timedelta = timedelta(0)
    ) -> SigningKey | None:
        """The key inserted as ``generation``; None when another got that generation first."""
        stamp = self.clock()
        key = new_signing_key(generation, stamp, stamp + lead)
        async with self.sessions() as session:
            await insert_or_ignore(session, SigningKey, **key.model_dump())
            await session.commit()
            return await session.get(SigningKey, key.kid)

    async def signer(self, session: AsyncSession) -> ActiveKey:
        """The key to sign a token with now (read in the caller's session)."""
        key = await _active(session, self.clock()) or await self.ensure_active()
        if not self._publishes(key.kid):
            # another replica rotated: publish the new key here too before its first token
            self._read_at = -math.inf
        private = self._private.get(key.kid)
        if private is None:
            if key.private_key_pem is None:
                raise RuntimeError(f"signing key {key.kid} has no private key")
            loaded = load_pem_private_key(key.private_key_pem.encode("ascii"), password=None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise RuntimeError(f"signing key {key.kid} is not an Ed25519 key")
            private = self._private[key.kid] = loaded
        return ActiveKey(key.kid, private)

    # -- publication ---------------------------------------------------------------------

    def _publishes(self, kid: str) -> bool:
        return self._jwks is not None and any(k.get("kid") == kid for k in self._jwks["keys"])

    async def published(self) -> list[dict[str, Any]]:
        """The public keys to publish, newest first: the active key and the superseded ones
        whose tokens may still be valid. Keys past that are retired here (lazily)."""
        async with self.sessions() as session:
            query = (
                select(SigningKey)
                .where(col(SigningKey.retired_at).is_(None))
                .order_by(col(SigningKey.generation))
            )
            keys = list((await session.exec(query)).all())
            stamp = self.clock()
            # a key is superseded when its successor became active; its last token was
            # signed then and is accepted until published_for later
            done = [
                key.kid
                for key, successor in itertools.pairwise(keys)
                if successor.activated_at + self.published_for <= stamp
            ]
            if done:
                await session.exec(
                    update(SigningKey)
                    .where(col(SigningKey.kid).in_(done), col(SigningKey.retired_at).is_(None))
                    .values(retired_at=stamp, private_key_pem=None)
                )
                await session.commit()
                for kid in done:
                    self._private.pop(kid, None)
                log.info("signing keys retired: %s", ", ".join(done))
        return [json.loads(key.public_jwk) for key in reversed(keys) if key.kid not in done]

    async def jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        """The JWKS document (``KeySource``): cached, read again after ``max_age`` seconds or
        on ``refresh`` (a token named an unknown kid: another replica may have rotated)."""
        if self._due(refresh):
            async with self._lock:
                if self._due(refresh):
                    await self._read()
        if self._jwks is None:
            raise KeysUnavailable(retry_after=max(1, math.ceil(self.min_interval)))
        return self._jwks

    def _due(self, refresh: bool) -> bool:
        age = time.monotonic() - self._read_at
        return age >= self.min_interval and (refresh or self._jwks is None or age >= self.max_age)

    async def _read(self) -> None:
        self._read_at = time.monotonic()
        try:
            self._jwks = {"keys": await self.published()}
        except (SQLAlchemyError, OSError) as exc:
            kept = "keeping the cached keys" if self._jwks is not None else "no keys yet"
            log.warning("signing keys could not be read (%s); %s", type(exc).__name__, kept)


async def _active(session: AsyncSession, stamp: datetime) -> SigningKey | None:
    query = (
        select(SigningKey)
        .where(col(SigningKey.retired_at).is_(None), col(SigningKey.activated_at) <= stamp)
        .order_by(col(SigningKey.generation).desc())
        .limit(1)
    )
    return (await session.exec(query)).first()


# -- routes ----------------------------------------------------------------------------------

router = APIRouter(tags=["tokens"])


class Jwk(BaseModel):
    kty: str = Field(examples=["OKP"])
    crv: str = Field(examples=["Ed25519"])
    x: str
    kid: str
    use: str = Field(examples=["sig"])
    alg: str = Field(examples=["EdDSA"])


class Jwks(BaseModel):
    keys: list[Jwk]


class Rotation(BaseModel):
    kid: str = Field(
        description="The new key: published now, every token names it from activated_at on."
    )
    activated_at: datetime = Field(
        description="When it starts signing: published first, so every service knows it."
    )
    previous_kid: str | None = Field(description="The key it supersedes (None: there was none).")
    previous_published_until: datetime | None = Field(
        description="When the superseded key leaves the JWKS: every token it signed has "
        "expired by then (token lifetime + verification leeway)."
    )


def signing_keys(request: Request) -> SigningKeys:
    keys: SigningKeys = request.app.state.signing_keys
    return keys


@router.get(
    JWKS_PATH,
    summary="The token signing keys (JWKS)",
    response_model=Jwks,
    dependencies=[public()],
    responses={503: {"description": "The keys could not be read yet."}},
)
async def jwks(request: Request) -> JSONResponse:
    """The public keys that verify access tokens (JWKS, RFC 7517).

    The active key, and during a rollover the previous one until every token it signed has
    expired. Cacheable for a minute; a token naming a key id not in a cached copy is the cue
    to fetch this again.
    """
    try:
        document = await signing_keys(request).jwks(refresh=True)
    except KeysUnavailable as exc:
        raise HTTPException(
            503, detail=str(exc), headers={"Retry-After": str(exc.retry_after)}
        ) from None
    return JSONResponse(document, headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"})


@router.post(
    "/signing-keys/rotate",
    summary="Rotate the token signing key",
    status_code=201,
    response_model=Rotation,
    dependencies=[require("signing-keys:write"), WRITES],
)
async def rotate_signing_key(request: Request) -> Rotation:
    """Rotate the token signing key (key rollover).

    The new key is published at once and signs from `activated_at` (20 s later: every service
    learns it first). The previous key stays in the JWKS until every token it signed has
    expired (`previous_published_until`), so tokens already issued keep working; then it is
    retired and its private half erased.
    """
    keys = signing_keys(request)
    made, previous = await keys.rotate()
    return Rotation(
        kid=made.kid,
        activated_at=made.activated_at,
        previous_kid=previous.kid if previous else None,
        previous_published_until=made.activated_at + keys.published_for if previous else None,
    )
