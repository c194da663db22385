"""``POST /oauth/token``: the client-credentials grant (RFC 6749 §4.4) issuing access tokens.

An API key is the client: its id is the ``client_id`` and its secret the client secret, sent
with HTTP Basic (RFC 6749 §2.3.1) or as the form field ``client_secret`` (the secret alone
identifies its key). The token is an RFC 9068 JWT signed with the active signing key; its
scopes are what the key owner's role allows, narrowed by the ``scope`` asked for.

Answers, errors included, are RFC 6749 JSON (§5.1, §5.2), never problem+json: OAuth clients
read ``error``. Error descriptions are fixed sentences that echo nothing sent.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, unquote_plus

import jwt
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.identity.models import ApiKey, User, hash_secret, looks_like_secret
from tributary.identity.rates import TOKEN
from tributary.identity.signing import ActiveKey, SigningKeys
from tributary.service.auth import SCOPES, AuthSettings, public, scopes_for_role
from tributary.service.caching import NO_STORE

log = logging.getLogger("tributary.identity.oauth")
router = APIRouter(tags=["tokens"])

GRANT_TYPE = "client_credentials"
MAX_BODY_BYTES = 8192
"""Far more than any token request needs (the form has four short fields)."""
_PARAMETERS = ("grant_type", "scope", "client_id", "client_secret")
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,60}")
BASIC_CHALLENGE = 'Basic realm="tributary"'

ErrorCode = Literal[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_scope",
    "unsupported_grant_type",
]


@dataclass(frozen=True)
class TokenIssuer:
    keys: SigningKeys
    settings: AuthSettings

    def issue(self, signer: ActiveKey, key: ApiKey, scopes: frozenset[str]) -> str:
        """A signed RFC 9068 access token for ``key`` (its owner is the subject)."""
        issued = int(self.keys.clock().timestamp())
        claims = {
            "iss": self.settings.issuer,
            "sub": key.user_id,
            "aud": self.settings.audience,
            "exp": issued + self.settings.token_ttl_seconds,
            "iat": issued,
            "nbf": issued,
            "jti": secrets.token_urlsafe(16),
            "client_id": key.id,
            "scope": " ".join(sorted(scopes)),
        }
        return jwt.encode(
            claims,
            signer.private_key,
            algorithm="EdDSA",
            headers={"kid": signer.kid, "typ": "at+jwt"},
        )


class OAuthError(Exception):
    """An RFC 6749 §5.2 error answer."""

    def __init__(self, error: ErrorCode, description: str, *, basic: bool = False) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.basic = basic
        """Client authentication was attempted with HTTP Basic: 401 with a challenge."""

    def response(self) -> JSONResponse:
        headers = dict(NO_STORE)
        status = 400
        if self.error == "invalid_client" and self.basic:
            status = 401
            headers["WWW-Authenticate"] = BASIC_CHALLENGE
        body = {"error": self.error, "error_description": self.description}
        return JSONResponse(body, status_code=status, headers=headers)


def _bad_client(*, basic: bool) -> OAuthError:
    # one answer for an unknown key, a wrong secret and a revoked key: nothing to probe
    return OAuthError("invalid_client", "the client credentials are not valid", basic=basic)


# -- the request -----------------------------------------------------------------------------


async def _form(request: Request) -> dict[str, str]:
    """The form parameters (RFC 6749 appendix B), each at most once; others are ignored.

    Read with a bound and parsed strictly here rather than by ``Request.form()``: whatever
    arrives, the answer must stay an RFC 6749 error, never another error shape.
    """
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise OAuthError("invalid_request", "the body is too large")
    try:
        pairs = parse_qsl(
            body.decode("ascii"), keep_blank_values=True, errors="strict", max_num_fields=20
        )
    except ValueError:  # undecodable octets or escapes, too many fields
        raise OAuthError("invalid_request", "the body is not a valid form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in _PARAMETERS:
            if name in form:
                raise OAuthError("invalid_request", "a parameter is repeated")
            form[name] = value
    return form


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    """``(client_id, secret)`` from an HTTP Basic ``Authorization`` header, if there is one."""
    values = request.headers.getlist("authorization")
    if not values:
        return None
    if len(values) > 1:
        raise OAuthError("invalid_request", "the Authorization header is repeated")
    scheme, _, credentials = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError("invalid_client", "client authentication must use HTTP Basic", basic=True)
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise OAuthError(
            "invalid_client", "the Basic credentials are not valid base64", basic=True
        ) from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise OAuthError(
            "invalid_client", "the Basic credentials lack the client secret", basic=True
        )
    # RFC 6749 §2.3.1: both are form-encoded before Basic encoding
    return unquote_plus(client_id), unquote_plus(secret)


async def _authenticate(
    session: AsyncSession, form: dict[str, str], basic: tuple[str, str] | None
) -> ApiKey:
    """The API key the request authenticates as; ``invalid_client`` otherwise."""
    claimed_id = form.get("client_id")
    key: ApiKey | None = None
    if basic is not None:
        if "client_secret" in form:
            raise OAuthError("invalid_request", "use one client authentication method, not two")
        client_id, secret = basic
        if _KEY_ID.fullmatch(client_id) and claimed_id in (None, client_id):
            key = await session.get(ApiKey, client_id)
    else:
        if (sent := form.get("client_secret")) is None:
            raise OAuthError(
                "invalid_client",
                "client authentication is missing: HTTP Basic or the client_secret parameter",
            )
        secret = sent
        if looks_like_secret(secret):  # the secret alone names its key
            query = select(ApiKey).where(col(ApiKey.secret_hash) == hash_secret(secret))
            key = (await session.exec(query)).first()
        if key is not None and claimed_id not in (None, key.id):
            key = None
    presented = hash_secret(secret)  # also for an unknown key: the same work either way
    if key is None or not hmac.compare_digest(key.secret_hash, presented):
        raise _bad_client(basic=basic is not None)
    if key.revoked_at is not None:
        raise _bad_client(basic=basic is not None)
    return key


def _granted(requested: str | None, role: str) -> frozenset[str]:
    allowed = scopes_for_role(role)
    if requested is None:
        return allowed
    scopes = frozenset(requested.split(" ")) - {""}
    if not scopes:
        raise OAuthError("invalid_scope", "the scope parameter is empty")
    if not scopes <= SCOPES.keys():
        raise OAuthError("invalid_scope", "the scope includes an unknown scope")
    if not scopes <= allowed:
        raise OAuthError("invalid_scope", "the scope exceeds what the key's owner may have")
    return scopes


# -- the route -------------------------------------------------------------------------------


class TokenRequest(BaseModel):
    grant_type: Literal["client_credentials"]
    scope: str | None = Field(
        default=None,
        description="Space-separated scopes to narrow the token to (default: all the key "
        "owner's role allows).",
        examples=["users:read keys:write"],
    )
    client_id: str | None = Field(
        default=None,
        description="The API key id: optional; if sent, it must be the key's (and the Basic "
        "user name, with HTTP Basic).",
    )
    client_secret: str | None = Field(
        default=None, description="The API key secret, when HTTP Basic is not used."
    )


class TokenAnswer(BaseModel):
    access_token: str = Field(description="An RFC 9068 JWT (EdDSA), sent as a Bearer token.")
    token_type: Literal["Bearer"]
    expires_in: int = Field(description="Seconds until the token expires.", examples=[300])
    scope: str = Field(description="The scopes granted, space-separated.")


class OAuthErrorBody(BaseModel):
    error: ErrorCode
    error_description: str


@router.post(
    "/oauth/token",
    summary="Get an access token",
    response_model=None,
    dependencies=[public(), TOKEN],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {"schema": TokenRequest.model_json_schema()}
            },
        }
    },
    responses={
        200: {"model": TokenAnswer, "description": "An access token."},
        400: {"model": OAuthErrorBody, "description": "RFC 6749 §5.2 error."},
        401: {"model": OAuthErrorBody, "description": "`invalid_client` with HTTP Basic."},
        429: {"description": "Too many token requests from this address (problem details)."},
    },
)
async def token(request: Request) -> JSONResponse:
    """Exchange an API key for an access token (OAuth 2.0 client credentials grant).

    Client authentication: HTTP Basic `<key id>:<secret>`, or the form field `client_secret`.
    A revoked or unknown key, or a wrong secret, is `invalid_client`; a `scope` beyond what the
    key owner's role allows is `invalid_scope`. Answers are never cached (`no-store`).
    """
    issuer: TokenIssuer = request.app.state.tokens
    try:
        form = await _form(request)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is missing")
        if grant_type != GRANT_TYPE:
            raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
        basic = _basic_credentials(request)
        async with request.app.state.sessions() as session:
            key = await _authenticate(session, form, basic)
            owner = await session.get(User, key.user_id)
            if owner is None:  # the foreign key forbids it; answered as an unknown key
                raise _bad_client(basic=basic is not None)
            scopes = _granted(form.get("scope"), owner.role)
            signer = await issuer.keys.signer(session)
    except OAuthError as exc:
        log.info("token refused: %s", exc.error)
        return exc.response()
    access_token = issuer.issue(signer, key, scopes)
    log.info("token issued to api key %s of user %s", key.id, key.user_id)
    answer = TokenAnswer(
        access_token=access_token,
        token_type="Bearer",  # noqa: S106  (the token type, no secret)
        expires_in=issuer.settings.token_ttl_seconds,
        scope=" ".join(sorted(scopes)),
    )
    return JSONResponse(answer.model_dump(), headers=NO_STORE)
