"""Bearer-token verification, shared by every service.

The model: identity signs short-lived access tokens (RFC 9068 JWTs, Ed25519) and publishes
its public keys as a JWKS. Every other service verifies a token *locally* with those public
keys: no call to identity per request, so a request costs one signature check, and services
keep answering while identity is briefly down. The price is that a token stays valid until
it expires (minutes), even after its API key is revoked.

Keys come from a ``KeySource``. ``JwksClient`` fetches identity's JWKS lazily (services start
in any order, so start-up never waits for identity), caches it, refreshes it every ten
minutes, and refreshes early when a token names a key id it does not know: that is how a key
rollover reaches every service. Anyone can send a token with a made-up key id, so that early
refresh is rate-limited (one real fetch per ten seconds): garbage tokens cannot turn a
service into a flood of requests against identity. A failed refresh keeps the last good set;
only a service that never obtained any keys answers 503 (with Retry-After).

Routes declare their rule with ``require(scope, owner=...)`` or ``public()``;
``route_rule``/``rules_by_route`` read it back, so a test can check that every route has
exactly one.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

import httpx
import jwt
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("tributary.service.auth")

DEFAULT_ISSUER = "http://127.0.0.1:8001"
JWKS_PATH = "/.well-known/jwks.json"
ALGORITHMS = ("EdDSA", "ES256")
"""Asymmetric algorithms only: never a shared secret, never ``none``."""
TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "scope", "client_id", "jti")
MAX_TOKEN_LENGTH = 4096
JWKS_MIN_INTERVAL = 10.0
"""Seconds between two real JWKS fetches of a service, however many unknown kids arrive."""
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class AuthSettings(BaseSettings):
    """Token settings shared by every service (identity also reads ``token_ttl_seconds``)."""

    model_config = SettingsConfigDict(
        env_prefix="TRIBUTARY_AUTH_", extra="ignore", frozen=True, populate_by_name=True
    )

    issuer: str = DEFAULT_ISSUER
    audience: str = "tributary"
    jwks_url: str = ""
    """Default: ``<issuer>/.well-known/jwks.json``."""
    leeway_seconds: int = Field(default=30, ge=0)
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
    token_ttl_seconds: int = Field(
        default=300, gt=0, validation_alias="TRIBUTARY_TOKEN_TTL_SECONDS"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_jwks_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("jwks_url"):
            issuer = str(data.get("issuer") or DEFAULT_ISSUER)
            data = {**data, "jwks_url": issuer.rstrip("/") + JWKS_PATH}
        return data


# -- scopes --------------------------------------------------------------------------------

SCOPES: Mapping[str, str] = {
    "users:read": "Read your own user profile and API keys",
    "users:write": "Change your own profile, or erase yourself",
    "keys:write": "Issue and revoke your own API keys",
    "workspaces:read": "Read your own workspace",
    "notifications:read": "Read your own notifications (and their live stream) and preferences",
    "notifications:write": "Mark your own notifications read and change your preferences",
    "billing:read": "Read your own subscriptions",
    "billing:write": "Start or cancel your own subscriptions",
    "users:admin": "Read, change or erase any user; list, issue or revoke anyone's API keys",
    "roles:write": "Change users' roles",
    "emails:read": "Read the emails sent",
    "audit:read": "Read the audit log",
    "audit:verify": "Verify the audit log's hash chain",
    "revenue:read": "Read billing's revenue per plan",
    "sagas:read": "Read billing's subscription sagas (state, steps, pending timeouts)",
    "signing-keys:write": "Rotate the token signing keys",
}
SELF_SCOPES = frozenset(
    {
        "users:read",
        "users:write",
        "keys:write",
        "workspaces:read",
        "notifications:read",
        "notifications:write",
        "billing:read",
        "billing:write",
    }
)
"""Granted to every user's keys; they act on the caller's own resources only."""
ADMIN_SCOPES = frozenset(SCOPES) - SELF_SCOPES
"""Granted only when the key owner's role is ``admin`` or ``owner``."""
ADMIN = "users:admin"


def scopes_for_role(role: str) -> frozenset[str]:
    """What a key whose owner has ``role`` may be granted (unknown roles: self scopes)."""
    return SELF_SCOPES | ADMIN_SCOPES if role in {"admin", "owner"} else SELF_SCOPES


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    subject: str
    """The user id of the API key's owner (``usr_...``)."""
    scopes: frozenset[str]
    client_id: str
    """The API key id (``key_...``)."""
    token_id: str
    expires_at: datetime

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes


# -- key sources ---------------------------------------------------------------------------


class KeysUnavailable(Exception):
    """No JWKS was ever obtained: the service cannot verify anything yet (503)."""

    def __init__(
        self,
        message: str = "the token signing keys are not available yet",
        *,
        retry_after: int = 10,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KeySource(Protocol):
    async def jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        """The JWKS document; ``refresh`` asks for a fresh one (a token named an unknown kid)."""
        ...


class StaticKeys:
    """A fixed JWKS (tests; a service given its keys by configuration)."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self._jwks = jwks

    async def jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        return self._jwks


@functools.cache
def _tls() -> ssl.SSLContext:
    """httpx's default TLS context, built once (loading the CA bundle is slow)."""
    return httpx.create_ssl_context()


class JwksClient:
    """Identity's JWKS over HTTP: fetched lazily, cached, refreshed on demand and periodically.

    At most one real fetch (successful or not) per ``min_interval`` seconds, whatever asks:
    that bounds both the load an unknown-kid flood puts on identity and the time a request
    can wait while identity is down (one request per interval pays the ``timeout``).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 3.0,
        max_age: float = 600.0,
        min_interval: float = JWKS_MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.max_age = max_age
        self.min_interval = min_interval
        self.fetches = 0
        """Real fetch attempts so far."""
        self._clock = clock
        self._http = httpx.AsyncClient(
            timeout=timeout, verify=_tls(), headers={"Accept": "application/json"}
        )
        self._jwks: dict[str, Any] | None = None
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._lock = asyncio.Lock()

    async def jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        if self._due(refresh) and not (self._jwks is not None and self._lock.locked()):
            # with keys cached, a periodic refresh already under way is not waited for
            async with self._lock:
                if self._due(refresh):  # another request may have fetched meanwhile
                    await self._fetch()
        elif self._jwks is None and self._lock.locked():
            async with self._lock:  # the first fetch is under way: wait for it, not 503
                pass
        if self._jwks is None:
            wait = self.min_interval - (self._clock() - self._attempted_at)
            raise KeysUnavailable(retry_after=max(1, math.ceil(wait)))
        return self._jwks

    def _due(self, refresh: bool) -> bool:
        now = self._clock()
        if now - self._attempted_at < self.min_interval:
            return False
        return refresh or self._jwks is None or now - self._fetched_at >= self.max_age

    async def _fetch(self) -> None:
        self._attempted_at = self._clock()
        self.fetches += 1
        try:
            response = await self._http.get(self.url)
            response.raise_for_status()
            document = response.json()
            if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
                raise ValueError("not a JWKS document")
        except (httpx.HTTPError, ValueError) as exc:
            kept = "keeping the cached keys" if self._jwks is not None else "no keys yet"
            log.warning("JWKS fetch from %s failed (%s); %s", self.url, type(exc).__name__, kept)
            return
        self._jwks = document
        self._fetched_at = self._clock()

    async def aclose(self) -> None:
        await self._http.aclose()


# -- verification --------------------------------------------------------------------------


class InvalidToken(Exception):
    """The token is not acceptable (401); the message says why, without the token."""


_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidIssuerError, "the token was issued by another issuer"),
    (jwt.InvalidAudienceError, "the token is meant for another audience"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's signing algorithm is not accepted"),
    (jwt.InvalidIssuedAtError, "the token's issue time is invalid"),
)


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token lacks the required claim {exc.claim}"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "the token is malformed"


def _parse_keys(document: Mapping[str, Any]) -> dict[str, jwt.PyJWK]:
    """Usable signing keys by kid; a key this verifier cannot use is skipped, not fatal."""
    keys: dict[str, jwt.PyJWK] = {}
    entries = document.get("keys")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWTError, TypeError, ValueError):
            log.warning("JWKS key %r skipped: not a usable public key", kid)
            continue
        if isinstance(kid, str) and kid and key.algorithm_name in ALGORITHMS:
            keys[kid] = key
    return keys


class Verifier:
    """Checks a bearer token against the source's keys and the settings' issuer/audience."""

    def __init__(self, source: KeySource, settings: AuthSettings | None = None) -> None:
        self.source = source
        self.settings = settings or AuthSettings()
        self._document: dict[str, Any] | None = None
        self._keys: dict[str, jwt.PyJWK] = {}

    async def verify(self, token: str) -> Principal:
        """The token's principal; ``InvalidToken`` (401) or ``KeysUnavailable`` (503)."""
        header = self._header(token)
        key = await self._key(header["kid"])
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(ALGORITHMS),
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_seconds,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(_reason(exc)) from None
        except (TypeError, ValueError, OverflowError):  # odd claim types in a signed token
            raise InvalidToken("the token is malformed") from None
        return _principal(claims)

    @staticmethod
    def _header(token: str) -> dict[str, Any]:
        """Cheap checks before any key lookup, so that junk never triggers a JWKS refresh."""
        if len(token) > MAX_TOKEN_LENGTH or not _COMPACT_JWS.fullmatch(token):
            raise InvalidToken("the token is malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the token is malformed") from None
        if header.get("alg") not in ALGORITHMS:
            raise InvalidToken("the token's signing algorithm is not accepted")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in TOKEN_TYPES:
            raise InvalidToken("the token is not an access token (typ at+jwt)")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("the token names no signing key (kid)")
        return header

    async def _key(self, kid: str) -> jwt.PyJWK:
        for refresh in (False, True):
            document = await self.source.jwks(refresh=refresh)
            if document != self._document:  # equality: a source may build a new dict per call
                self._keys = _parse_keys(document)
                self._document = copy.deepcopy(document)
            if kid in self._keys:
                return self._keys[kid]
        raise InvalidToken("the token is signed with an unknown key")


def _principal(claims: dict[str, Any]) -> Principal:
    strings = ("sub", "scope", "client_id", "jti")
    if not all(isinstance(claims[name], str) for name in strings):
        raise InvalidToken("the token is malformed")
    try:
        expires_at = datetime.fromtimestamp(int(claims["exp"]), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise InvalidToken("the token's expiry is invalid") from None
    return Principal(
        subject=claims["sub"],
        scopes=frozenset(claims["scope"].split()),
        client_id=claims["client_id"],
        token_id=claims["jti"],
        expires_at=expires_at,
    )


# -- route dependencies --------------------------------------------------------------------

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    bearerFormat="JWT",
    description="An access token from identity's `POST /oauth/token` (client credentials).",
)


@dataclass(frozen=True)
class Rule:
    """A route's access rule, as declared with ``require`` or ``public``."""

    scope: str | None
    owner: str | None
    public: bool


_RULES: dict[int, Rule] = {}
"""Rules by ``id()`` of their dependency callable (those live as long as the module)."""


def _challenge(error: str | None = None, scope: str | None = None) -> dict[str, str]:
    value = "Bearer" if error is None else f'Bearer error="{error}"'
    if scope is not None:
        value += f', scope="{scope}"'
    return {"WWW-Authenticate": value}


def not_owner() -> HTTPException:
    """403 for a caller acting on another user's resource without ``users:admin``."""
    return HTTPException(
        403,
        detail=f"only the owner, or a token with {ADMIN}, may do this",
        headers=_challenge("insufficient_scope", ADMIN),
    )


@functools.cache
def _guard(scope: str, owner: str | None) -> Callable[..., Any]:
    """One dependency per rule, so a rule used twice on a route verifies once (FastAPI cache)."""

    async def guard(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if credentials is None:
            raise HTTPException(401, detail="a bearer token is required", headers=_challenge())
        verifier: Verifier = request.app.state.auth
        try:
            principal = await verifier.verify(credentials.credentials)
        except InvalidToken as exc:
            log.debug("bearer token rejected: %s", exc)
            raise HTTPException(401, detail=str(exc), headers=_challenge("invalid_token")) from None
        except KeysUnavailable as exc:
            raise HTTPException(
                503,
                detail=f"{exc}; retry later",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        if not principal.has(scope):
            raise HTTPException(
                403,
                detail=f"the token lacks the scope {scope}",
                headers=_challenge("insufficient_scope", scope),
            )
        if owner is not None:
            if owner not in request.path_params:
                raise RuntimeError(f"require(owner={owner!r}): no such path parameter")
            if request.path_params[owner] != principal.subject and not principal.is_admin:
                raise not_owner()
        request.state.principal = principal
        return principal

    _RULES[id(guard)] = Rule(scope=scope, owner=owner, public=False)
    return guard


def require(scope: str, *, owner: str | None = None) -> Any:
    """A dependency admitting a valid bearer token with ``scope``.

    ``owner``: the path parameter holding a user id; a token for another user also needs
    ``users:admin``. Use in ``dependencies=[require(...)]`` or as a parameter
    ``principal: Annotated[Principal, require(...)]``.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; declare it in SCOPES")
    return Security(_guard(scope, owner), scopes=[scope])


async def _public() -> None:
    """Deliberately open: no token read, none required."""


_RULES[id(_public)] = Rule(scope=None, owner=None, public=True)


def public() -> Any:
    """A dependency marking a route deliberately unauthenticated: ``dependencies=[public()]``."""
    return Depends(_public)


def _rules(route: APIRoute | RouteContext) -> list[Rule]:
    found: list[Rule] = []

    def walk(dependant: Dependant) -> None:
        rule = _RULES.get(id(dependant.call))
        if rule is not None and rule not in found:
            found.append(rule)
        for sub in dependant.dependencies:
            walk(sub)

    walk(route.dependant)
    return found


def route_rule(route: APIRoute | RouteContext) -> Rule | None:
    """The route's rule, None without one; ValueError when it declares several.

    Rules given to ``include_router``/``APIRouter(dependencies=...)`` count: they are part of
    the route's effective dependency tree (a ``RouteContext`` from ``iter_route_contexts``).
    """
    rules = _rules(route)
    if len(rules) > 1:
        raise ValueError(f"{route.path}: several access rules {rules}")
    return rules[0] if rules else None


def rules_by_route(app: FastAPI) -> dict[str, Rule | None]:
    """``{"GET /users/{user_id}": Rule(...), ...}`` for every API route of the app.

    Since FastAPI 0.137 ``app.routes`` holds included routers as opaque entries, so a loop
    over ``app.routes`` keeping ``APIRoute``s silently misses them; this walks them all.
    ValueError for a route with several rules, or whose ``owner`` is not a path parameter.
    """
    found: dict[str, Rule | None] = {}
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, APIRoute):
            rule = route_rule(context)
            owner = rule.owner if rule is not None else None
            if owner is not None and owner not in context.param_convertors:
                raise ValueError(f"{context.path}: owner {owner!r} is no path parameter")
            for method in sorted(context.methods or ()):
                found[f"{method} {context.path}"] = rule
    return found
