"""Bearer-token verification against a JWKS served over real HTTP, and the route rules."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from tributary.messaging.testing import isolated_settings
from tributary.service.app import ServiceSpec, create_app
from tributary.service.auth import (
    ADMIN_SCOPES,
    SCOPES,
    SELF_SCOPES,
    AuthSettings,
    InvalidToken,
    JwksClient,
    KeysUnavailable,
    Principal,
    Rule,
    StaticKeys,
    Verifier,
    public,
    require,
    route_rule,
    rules_by_route,
    scopes_for_role,
)
from tributary.service.settings import ServiceSettings
from tributary.testkit.infra import Found
from tributary.testkit.processes import free_port
from tributary.testkit.waiting import eventually

ISSUER = "http://identity.test"
SETTINGS = AuthSettings(issuer=ISSUER, audience="tributary", leeway_seconds=30)
ALICE = "usr_alice0000000000000000"
BOB = "usr_bob000000000000000000"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    return b64(json.dumps(value).encode())


class Signer:
    """Signs tokens the way identity does (Ed25519, typ at+jwt), with claims to override."""

    def __init__(self, kid: str | None = None) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.kid = kid or f"k-{secrets.token_hex(4)}"

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = OKPAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "EdDSA"}

    def claims(
        self, subject: str = ALICE, scope: str = "users:read", **overrides: Any
    ) -> dict[str, Any]:
        issued = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": subject,
            "aud": "tributary",
            "iat": issued,
            "nbf": issued,
            "exp": issued + 300,
            "jti": secrets.token_hex(8),
            "client_id": "key_alice",
            "scope": scope,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        subject: str = ALICE,
        scope: str = "users:read",
        *,
        header: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        return self.sign(self.claims(subject, scope, **claims), header)

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        headers = {"kid": self.kid, "typ": "at+jwt", **(header or {})}
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers=headers)


def jwks_of(*signers: Signer) -> dict[str, Any]:
    return {"keys": [s.jwk() for s in signers]}


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class JwksServer:
    """Identity's JWKS endpoint: a real HTTP server on 127.0.0.1 that counts its requests."""

    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    port: int = field(default_factory=free_port)
    hits: int = 0
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def start(self) -> None:
        app = FastAPI()

        @app.get("/.well-known/jwks.json")
        async def jwks() -> dict[str, Any]:
            self.hits += 1
            return self.document

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = server = uvicorn.Server(config)
        self._task = asyncio.create_task(server.serve())

        async def started() -> bool:
            assert self._task is not None
            assert not self._task.done(), "the JWKS server died"
            return server.started

        await eventually(started, timeout=10, what="the JWKS server to listen")

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None


@pytest.fixture(scope="module")
async def shared_jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def jwks_server(shared_jwks_server: JwksServer) -> JwksServer:
    """The module's JWKS server, emptied (a test that stops a server starts its own)."""
    shared_jwks_server.document = {"keys": []}
    shared_jwks_server.hits = 0
    return shared_jwks_server


@pytest.fixture
async def own_jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client_for(clock: Clock) -> AsyncIterator[Any]:
    """``client_for(url)``: a JwksClient on the test clock, closed afterwards."""
    made: list[JwksClient] = []

    def make(url: str) -> JwksClient:
        made.append(JwksClient(url, timeout=2, clock=clock))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


def protected_app(verifier: Verifier) -> FastAPI:
    app = FastAPI()
    app.state.auth = verifier

    @app.get("/me")
    async def me(
        request: Request, principal: Annotated[Principal, require("users:read")]
    ) -> dict[str, Any]:
        assert request.state.principal is principal
        return {
            "subject": principal.subject,
            "client_id": principal.client_id,
            "scopes": sorted(principal.scopes),
            "admin": principal.is_admin,
        }

    @app.get("/users/{user_id}", dependencies=[require("users:read", owner="user_id")])
    async def user(user_id: str) -> dict[str, str]:
        return {"id": user_id}

    @app.get("/open", dependencies=[public()])
    async def open_() -> dict[str, str]:
        return {"status": "open"}

    return app


async def call(app: FastAPI, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


def assert_invalid(response: httpx.Response, why: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert why in response.json()["detail"]


@pytest.fixture(scope="module")
def shared_app() -> FastAPI:
    return protected_app(Verifier(StaticKeys({"keys": []}), SETTINGS))


@pytest.fixture
async def setup(
    jwks_server: JwksServer, client_for: Any, shared_app: FastAPI
) -> tuple[Signer, JwksServer, JwksClient, FastAPI]:
    """A fresh key, published by the JWKS server; the app verifies with a fresh JwksClient."""
    signer = Signer()
    jwks_server.document = jwks_of(signer)
    source: JwksClient = client_for(jwks_server.url)
    shared_app.state.auth = Verifier(source, SETTINGS)
    return signer, jwks_server, source, shared_app


Setup = tuple[Signer, JwksServer, JwksClient, FastAPI]


# -- the catalogue ---------------------------------------------------------------------------


def test_scopes_split_into_self_and_admin() -> None:
    assert set(SCOPES) == SELF_SCOPES | ADMIN_SCOPES
    assert not SELF_SCOPES & ADMIN_SCOPES
    assert all(SCOPES[s].strip() for s in SCOPES)
    assert scopes_for_role("member") == SELF_SCOPES
    assert scopes_for_role("admin") == scopes_for_role("owner") == SELF_SCOPES | ADMIN_SCOPES
    assert "users:admin" in ADMIN_SCOPES


def test_an_unknown_scope_is_refused_when_the_route_is_declared() -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        require("users:reed")


def test_settings_derive_the_jwks_url_from_the_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIBUTARY_AUTH_ISSUER", "http://id.example:9000/")
    monkeypatch.setenv("TRIBUTARY_TOKEN_TTL_SECONDS", "120")
    loaded = AuthSettings()
    assert loaded.jwks_url == "http://id.example:9000/.well-known/jwks.json"
    assert (loaded.audience, loaded.leeway_seconds, loaded.token_ttl_seconds) == (
        "tributary",
        30,
        120,
    )
    monkeypatch.setenv("TRIBUTARY_AUTH_JWKS_URL", "http://keys.example/jwks")
    assert AuthSettings().jwks_url == "http://keys.example/jwks"


# -- valid tokens ----------------------------------------------------------------------------


async def test_a_valid_token_gives_its_principal(setup: Setup) -> None:
    signer, server, _, app = setup
    response = await call(app, "/me", signer.token(scope="users:read keys:write"))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "subject": ALICE,
        "client_id": "key_alice",
        "scopes": ["keys:write", "users:read"],
        "admin": False,
    }
    assert server.hits == 1
    assert (await call(app, "/me", signer.token())).status_code == 200
    assert server.hits == 1  # cached


async def test_the_verifier_returns_every_claim_it_promises() -> None:
    signer = Signer()
    expires = int(time.time()) + 120
    principal = await Verifier(StaticKeys(jwks_of(signer)), SETTINGS).verify(
        signer.token(BOB, "users:read users:admin", exp=expires, jti="tok_1", client_id="key_b")
    )
    assert principal.subject == BOB
    assert principal.scopes == {"users:read", "users:admin"}
    assert (principal.client_id, principal.token_id) == ("key_b", "tok_1")
    assert principal.expires_at.timestamp() == expires
    assert principal.is_admin
    assert principal.has("users:read")
    assert not principal.has("roles:write")


async def test_an_es256_key_is_accepted_too() -> None:
    key = generate_private_key(SECP256R1())
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    keys = StaticKeys({"keys": [{**jwk, "kid": "ec", "use": "sig", "alg": "ES256"}]})
    token = jwt.encode(
        Signer().claims(), key, algorithm="ES256", headers={"kid": "ec", "typ": "at+jwt"}
    )
    assert (await Verifier(keys, SETTINGS).verify(token)).subject == ALICE


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/At+Jwt"])
async def test_the_access_token_type_is_case_insensitive(setup: Setup, typ: str) -> None:
    signer, _, _, app = setup
    assert (await call(app, "/me", signer.token(header={"typ": typ}))).status_code == 200


async def test_expiry_within_the_leeway_is_tolerated(setup: Setup) -> None:
    signer, _, _, app = setup
    now = int(time.time())
    late = signer.token(iat=now - 320, nbf=now - 320, exp=now - 20)
    early = signer.token(iat=now + 20, nbf=now + 20, exp=now + 320)
    assert (await call(app, "/me", late)).status_code == 200
    assert (await call(app, "/me", early)).status_code == 200


# -- rejected tokens -------------------------------------------------------------------------


async def test_no_token_is_a_bare_bearer_challenge(setup: Setup) -> None:
    _, server, _, app = setup
    for headers in ({}, {"Authorization": "Basic dTpw"}, {"Authorization": "Bearer "}):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/me", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "bearer token is required" in response.json()["detail"]
    assert (await call(app, "/open")).json() == {"status": "open"}
    assert server.hits == 0  # nothing needed a key


async def test_an_expired_token_is_refused(setup: Setup) -> None:
    signer, _, _, app = setup
    now = int(time.time())
    assert_invalid(
        await call(app, "/me", signer.token(iat=now - 400, nbf=now - 400, exp=now - 31)),
        "expired",
    )


async def test_a_token_not_valid_yet_is_refused(setup: Setup) -> None:
    signer, _, _, app = setup
    now = int(time.time())
    assert_invalid(await call(app, "/me", signer.token(nbf=now + 120)), "not valid yet")
    assert_invalid(
        await call(app, "/me", signer.token(iat=now + 120, nbf=now + 120, exp=now + 400)),
        "not valid yet",
    )


async def test_another_issuer_or_audience_is_refused(setup: Setup) -> None:
    signer, _, _, app = setup
    assert_invalid(await call(app, "/me", signer.token(iss="http://evil.test")), "issuer")
    assert_invalid(await call(app, "/me", signer.token(aud="billing")), "audience")


@pytest.mark.parametrize("claim", ["exp", "iat", "iss", "aud", "sub", "scope", "client_id", "jti"])
async def test_a_missing_claim_is_refused(setup: Setup, claim: str) -> None:
    signer, _, _, app = setup
    claims = signer.claims()
    del claims[claim]
    assert_invalid(await call(app, "/me", signer.sign(claims)), f"required claim {claim}")


async def test_claims_of_the_wrong_type_are_refused(setup: Setup) -> None:
    signer, _, _, app = setup
    wrong: list[dict[str, Any]] = [
        {"scope": ["users:read"]},
        {"sub": 7},
        {"client_id": {}},
        {"jti": None},
        {"exp": "soon"},
        {"iat": "then"},
        {"aud": ["billing"]},
    ]
    for claims in wrong:
        assert_invalid(await call(app, "/me", signer.sign({**signer.claims(), **claims})), "")


async def test_a_wrong_signature_is_refused(setup: Setup) -> None:
    signer, _, _, app = setup
    impostor = Signer(kid=signer.kid)  # same key id, another private key
    assert_invalid(await call(app, "/me", impostor.token()), "signature")
    header, payload, signature = signer.token().split(".")
    forged = segment({**json.loads(base64.urlsafe_b64decode(payload + "==")), "sub": BOB})
    assert_invalid(await call(app, "/me", f"{header}.{forged}.{signature}"), "signature")


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt2", 1])
async def test_a_token_that_is_not_an_access_token_is_refused(setup: Setup, typ: Any) -> None:
    signer, _, _, app = setup
    token = jwt.encode(
        signer.claims(), signer.key, algorithm="EdDSA", headers={"kid": signer.kid, "typ": typ}
    )
    if typ is None:
        header, rest = token.split(".", 1)
        decoded = json.loads(base64.urlsafe_b64decode(header + "=="))
        token = f"{segment({k: v for k, v in decoded.items() if k != 'typ'})}.{rest}"
    assert_invalid(await call(app, "/me", token), "")


async def test_alg_none_is_refused(setup: Setup) -> None:
    signer, server, _, app = setup
    body = segment(signer.claims())
    for alg in ("none", "None", "NONE"):
        head = segment({"alg": alg, "typ": "at+jwt", "kid": signer.kid})
        assert_invalid(await call(app, "/me", f"{head}.{body}."), "malformed")
        assert_invalid(await call(app, "/me", f"{head}.{body}.{b64(b'x')}"), "algorithm")
    assert server.hits == 0  # refused before any key was looked up


async def test_hs256_signed_with_the_public_key_is_refused(setup: Setup) -> None:
    """Algorithm confusion: the public key (raw, PEM or JWK text) used as an HMAC secret."""
    signer, server, _, app = setup
    public_key = signer.key.public_key()
    secrets_tried = [
        public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        json.dumps(signer.jwk()).encode(),
        signer.jwk()["x"].encode(),
    ]
    for secret in secrets_tried:
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            signing_input = (
                f"{segment({'alg': alg, 'typ': 'at+jwt', 'kid': signer.kid})}."
                f"{segment(signer.claims())}"
            )
            mac = hmac.new(secret, signing_input.encode(), digest).digest()
            assert_invalid(await call(app, "/me", f"{signing_input}.{b64(mac)}"), "algorithm")
    assert server.hits == 0


async def test_a_token_without_a_key_id_is_refused(setup: Setup) -> None:
    signer, server, _, app = setup
    token = jwt.encode(signer.claims(), signer.key, algorithm="EdDSA", headers={"typ": "at+jwt"})
    assert_invalid(await call(app, "/me", token), "kid")
    for kid in ("", 5, None, ["a"]):
        head = segment({"alg": "EdDSA", "typ": "at+jwt", "kid": kid})
        assert_invalid(await call(app, "/me", f"{head}.{segment(signer.claims())}.{b64(b's')}"), "")
    assert server.hits == 0


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c.d",
        "a.b.c",
        "....",
        "é.é.é",
        "eyJhbGciOiJFZERTQSJ9.e30.c2ln",  # header without typ or kid
        "W10.e30.c2ln",  # header is a JSON array
        "bnVsbA.e30.c2ln",  # header is null
        "x" * 200_000,
        "a." * 5000 + "b",
        f"{segment({'alg': 'EdDSA', 'typ': 'at+jwt', 'kid': 'k'})}.%%%.c2ln",
    ],
)
async def test_malformed_tokens_are_401_not_500(setup: Setup, token: str) -> None:
    _, _, _, app = setup
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(
            "/me", headers=[(b"Authorization", b"Bearer " + token.encode())]
        )
    assert response.status_code == 401
    assert token not in response.text or len(token) < 6  # never echoed


# -- scopes and ownership --------------------------------------------------------------------


async def test_a_missing_scope_is_403_naming_the_scope(setup: Setup) -> None:
    signer, _, _, app = setup
    response = await call(app, "/me", signer.token(scope="keys:write workspaces:read"))
    assert response.status_code == 403
    assert (
        response.headers["www-authenticate"]
        == 'Bearer error="insufficient_scope", scope="users:read"'
    )
    assert "users:read" in response.json()["detail"]
    # a scope is a whole word, never a prefix
    assert (await call(app, "/me", signer.token(scope="users:reader"))).status_code == 403
    assert (await call(app, "/me", signer.token(scope=""))).status_code == 403


async def test_only_the_owner_or_an_admin_reaches_a_users_resource(setup: Setup) -> None:
    signer, _, _, app = setup
    alice = signer.token(ALICE, "users:read")
    assert (await call(app, f"/users/{ALICE}", alice)).json() == {"id": ALICE}
    other = await call(app, f"/users/{BOB}", alice)
    assert other.status_code == 403
    assert (
        other.headers["www-authenticate"]
        == 'Bearer error="insufficient_scope", scope="users:admin"'
    )
    admin = signer.token(ALICE, "users:read users:admin")
    assert (await call(app, f"/users/{BOB}", admin)).json() == {"id": BOB}
    # users:admin does not stand in for the route's own scope
    assert (await call(app, f"/users/{BOB}", signer.token(ALICE, "users:admin"))).status_code == 403


# -- keys: refresh, rollover, outages --------------------------------------------------------


async def test_an_unknown_kid_refreshes_once_then_is_refused(setup: Setup, clock: Clock) -> None:
    signer, server, _, app = setup
    assert (await call(app, "/me", signer.token())).status_code == 200
    clock.advance(11)
    stranger = Signer()
    assert_invalid(await call(app, "/me", stranger.token()), "unknown key")
    assert server.hits == 2  # the first fetch and one refresh
    assert_invalid(await call(app, "/me", stranger.token()), "unknown key")
    assert server.hits == 2  # within the interval: no second refresh


async def test_a_key_rollover_is_picked_up_and_the_old_key_kept_while_listed(
    setup: Setup, clock: Clock
) -> None:
    old, server, _, app = setup
    assert (await call(app, "/me", old.token())).status_code == 200
    new = Signer()
    server.document = jwks_of(new, old)
    clock.advance(11)
    assert (await call(app, "/me", new.token())).status_code == 200
    assert server.hits == 2
    assert (await call(app, "/me", old.token())).status_code == 200
    assert server.hits == 2
    server.document = jwks_of(new)  # the old key retired
    clock.advance(601)  # the periodic refresh
    assert (await call(app, "/me", new.token())).status_code == 200
    assert server.hits == 3
    assert_invalid(await call(app, "/me", old.token()), "unknown key")


async def test_unknown_kids_cause_at_most_one_fetch_per_interval(
    setup: Setup, clock: Clock
) -> None:
    signer, server, source, app = setup
    assert (await call(app, "/me", signer.token())).status_code == 200
    for _ in range(3):
        clock.advance(source.min_interval)
        before = server.hits
        responses = await asyncio.gather(*(call(app, "/me", Signer().token()) for _ in range(25)))
        assert {r.status_code for r in responses} == {401}
        assert server.hits == before + 1
        clock.advance(source.min_interval / 2)
        assert (await call(app, "/me", Signer().token())).status_code == 401
        assert server.hits == before + 1


async def test_concurrent_first_requests_wait_for_the_first_fetch(setup: Setup) -> None:
    """Requests arriving while the very first JWKS fetch is under way wait for it (no 503)."""
    signer, server, _, app = setup
    tokens = [signer.token() for _ in range(25)]
    responses = await asyncio.gather(*(call(app, "/me", token) for token in tokens))
    assert {r.status_code for r in responses} == {200}
    assert server.hits == 1


async def test_no_keys_ever_is_503_with_retry_after(client_for: Any, clock: Clock) -> None:
    server = JwksServer()  # not started: nothing listens on its port
    source: JwksClient = client_for(server.url)
    app = protected_app(Verifier(source, SETTINGS))
    signer = Signer()
    response = await call(app, "/me", signer.token())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "10"
    assert "retry later" in response.json()["detail"]
    assert source.fetches == 1
    clock.advance(4)
    again = await call(app, "/me", signer.token())
    assert (again.status_code, again.headers["retry-after"]) == (503, "6")
    assert source.fetches == 1  # not hammering an identity that is down
    # a token that cannot be valid is still a 401, keys or not
    assert (await call(app, "/me", "junk")).status_code == 401
    server.document = jwks_of(signer)
    await server.start()
    try:
        clock.advance(6)
        assert (await call(app, "/me", signer.token())).status_code == 200
    finally:
        await server.stop()


async def test_a_jwks_outage_after_the_first_fetch_keeps_the_cached_keys(
    own_jwks_server: JwksServer, client_for: Any, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    server, signer = own_jwks_server, Signer()
    server.document = jwks_of(signer)
    source: JwksClient = client_for(server.url)
    app = protected_app(Verifier(source, SETTINGS))
    assert (await call(app, "/me", signer.token())).status_code == 200
    await server.stop()
    clock.advance(601)  # due for the periodic refresh, which fails
    assert (await call(app, "/me", signer.token())).status_code == 200
    clock.advance(11)
    assert_invalid(await call(app, "/me", Signer().token()), "unknown key")  # refresh fails too
    assert source.fetches == 3
    assert "keeping the cached keys" in caplog.text
    assert signer.token() not in caplog.text


async def test_a_broken_jwks_document_is_not_cached(
    client_for: Any, jwks_server: JwksServer
) -> None:
    signer = Signer()
    source: JwksClient = client_for(jwks_server.url)
    jwks_server.document = {"no": "keys"}
    with pytest.raises(KeysUnavailable):
        await source.jwks()
    # unusable entries are skipped, the usable key still works
    jwks_server.document = {
        "keys": [{"kty": "OKP", "crv": "Ed448", "x": "AA", "kid": "bad"}, {"kid": "x"}, 7]
        + jwks_of(signer)["keys"]
    }
    fresh: JwksClient = client_for(jwks_server.url)
    principal = await Verifier(fresh, SETTINGS).verify(signer.token())
    assert principal.subject == ALICE


# -- route rules and OpenAPI -----------------------------------------------------------------


def test_every_route_names_its_rule() -> None:
    app = protected_app(Verifier(StaticKeys({"keys": []}), SETTINGS))
    router = APIRouter(dependencies=[require("audit:read")])

    @router.get("/twice")
    async def twice(_: Annotated[Principal, require("audit:read")]) -> None:
        """The same rule twice is one rule."""

    inner = APIRouter()

    @inner.post("/inner/{user_id}")
    async def nested(user_id: str) -> None: ...

    router.include_router(inner, prefix="/deep")
    app.include_router(router, prefix="/v1")
    assert rules_by_route(app) == {
        "GET /me": Rule("users:read", None, False),
        "GET /users/{user_id}": Rule("users:read", "user_id", False),
        "GET /open": Rule(None, None, True),
        "GET /v1/twice": Rule("audit:read", None, False),
        # the including router's rule reaches the routes of routers included in it
        "POST /v1/deep/inner/{user_id}": Rule("audit:read", None, False),
    }
    direct = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == "/me")
    assert route_rule(direct) == Rule("users:read", None, False)


def test_contradicting_rules_are_an_error() -> None:
    app = FastAPI()
    router = APIRouter(dependencies=[require("audit:read")])

    @router.get("/conflict", dependencies=[public()])
    async def conflict() -> None: ...

    app.include_router(router)
    with pytest.raises(ValueError, match="several"):
        rules_by_route(app)


def test_an_owner_that_is_no_path_parameter_is_an_error() -> None:
    app = FastAPI()

    @app.get("/users/{id}", dependencies=[require("users:read", owner="user_id")])
    async def misnamed(id: str) -> None: ...

    with pytest.raises(ValueError, match="no path parameter"):
        rules_by_route(app)


def test_a_route_without_a_rule_is_reported() -> None:
    app = FastAPI()
    router = APIRouter()

    @router.get("/forgotten")
    async def forgotten() -> None: ...

    app.include_router(router, prefix="/x")
    assert rules_by_route(app) == {"GET /x/forgotten": None}


def test_openapi_shows_the_bearer_scheme_and_each_routes_scope() -> None:
    spec = protected_app(Verifier(StaticKeys({"keys": []}), SETTINGS)).openapi()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert spec["paths"]["/me"]["get"]["security"] == [{"bearerAuth": ["users:read"]}]
    assert spec["paths"]["/users/{user_id}"]["get"]["security"] == [{"bearerAuth": ["users:read"]}]
    assert "security" not in spec["paths"]["/open"]["get"]


# -- in a service ----------------------------------------------------------------------------


@pytest.mark.broker
async def test_a_service_starts_without_identity_and_verifies_lazily(
    tmp_path: Path, rabbitmq: Found, jwks_server: JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = Signer()
    jwks_server.document = jwks_of(signer)
    monkeypatch.setenv("TRIBUTARY_AUTH_ISSUER", ISSUER)
    monkeypatch.setenv("TRIBUTARY_AUTH_JWKS_URL", jwks_server.url)
    router = APIRouter()

    @router.get("/things/{user_id}", dependencies=[require("users:read", owner="user_id")])
    async def things(user_id: str) -> list[str]:
        return []

    app = create_app(
        ServiceSpec(
            name="authsvc",
            settings=ServiceSettings(
                database_url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", port=0
            ),
            migrations=None,
            routers=[router],
            messaging=isolated_settings(rabbitmq.url),
        )
    )
    rules = rules_by_route(app)
    assert {"GET /health/live", "GET /health/ready", "GET /metrics"} <= set(rules)
    assert rules["GET /metrics"] == rules["GET /health/ready"] == Rule(None, None, True)
    assert rules["GET /things/{user_id}"] == Rule("users:read", "user_id", False)
    async with app.router.lifespan_context(app):
        assert jwks_server.hits == 0  # start-up did not wait for identity
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for open_path in ("/health/live", "/metrics"):
                assert (await client.get(open_path)).status_code == 200
            assert (await client.get(f"/things/{ALICE}")).status_code == 401
            token = {"Authorization": f"Bearer {signer.token()}"}
            assert (await client.get(f"/things/{ALICE}", headers=token)).status_code == 200
            assert (await client.get(f"/things/{BOB}", headers=token)).status_code == 403
        assert jwks_server.hits == 1
        source = app.state.auth.source
    assert isinstance(source, JwksClient)
    assert source._http.is_closed


@pytest.mark.broker
async def test_a_key_source_factory_replaces_the_jwks_client(
    tmp_path: Path, rabbitmq: Found
) -> None:
    signer = Signer()
    built: list[FastAPI] = []

    def own_keys(app: FastAPI) -> StaticKeys:
        assert app.state.engine is not None
        built.append(app)
        return StaticKeys(jwks_of(signer))

    app = create_app(
        ServiceSpec(
            name="authown",
            settings=ServiceSettings(
                database_url=f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", port=0
            ),
            migrations=None,
            messaging=isolated_settings(rabbitmq.url),
            key_source=own_keys,
        )
    )
    async with app.router.lifespan_context(app):
        assert built == [app]
        verifier: Verifier = app.state.auth
        assert isinstance(verifier.source, StaticKeys)


# -- foreign input ---------------------------------------------------------------------------

ANY_CHARACTER = st.characters(exclude_categories=())
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(ANY_CHARACTER),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FUZZ_SIGNER = Signer(kid="fuzz")


@st.composite
def jws_like(draw: st.DrawFn) -> bytes:
    """Three base64url segments: headers naming a known or unknown key, any claims, any bytes."""
    header = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "alg": st.sampled_from(["EdDSA", "ES256", "HS256", "none", "RS256"]) | JSON,
                "typ": st.sampled_from(["at+jwt", "JWT", "application/at+jwt"]) | JSON,
                "kid": st.sampled_from(["fuzz", "other"]) | JSON,
                "b64": st.booleans(),
                "crit": JSON,
            },
        )
    )
    claims = draw(st.dictionaries(st.sampled_from(sorted(FUZZ_SIGNER.claims())), JSON) | JSON)
    signature = draw(st.binary(max_size=80))
    return f"{segment(header)}.{segment(claims)}.{b64(signature)}".encode()


AUTHORIZATION = st.one_of(
    st.binary(max_size=300),
    st.text(ANY_CHARACTER, max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(ANY_CHARACTER, max_size=300).map(
        lambda t: b"Bearer " + t.encode("utf-8", "surrogatepass")
    ),
    st.binary(max_size=300).map(lambda b: b"Bearer " + b),
    jws_like().map(lambda t: b"Bearer " + t),
    jws_like().map(lambda t: b"bearer  " + t),
)


@pytest.fixture(scope="module")
def fuzz_app() -> FastAPI:
    return protected_app(Verifier(StaticKeys(jwks_of(FUZZ_SIGNER)), SETTINGS))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=AUTHORIZATION, path=st.sampled_from(["/me", f"/users/{ALICE}"]))
async def test_any_authorization_header_is_401_never_500(
    fuzz_app: FastAPI, value: bytes, path: str
) -> None:
    transport = httpx.ASGITransport(app=fuzz_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(path, headers=[(b"Authorization", value)])
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")


@st.composite
def mutated_claims(draw: st.DrawFn) -> dict[str, Any]:
    """Valid claims with some dropped or replaced by any JSON, and extra ones."""
    claims = FUZZ_SIGNER.claims()
    for name in sorted(claims):
        action = draw(st.sampled_from(["keep", "keep", "keep", "drop", "replace"]))
        if action == "drop":
            del claims[name]
        elif action == "replace":
            claims[name] = draw(JSON)
    return {**draw(st.dictionaries(st.text(max_size=8), JSON, max_size=3)), **claims}


@settings(max_examples=200, deadline=None)
@given(claims=mutated_claims())
async def test_any_claims_signed_by_the_key_verify_or_are_refused(claims: dict[str, Any]) -> None:
    """Even a validly signed token with odd claims is a principal or InvalidToken, not a crash."""
    signing_input = f"{segment({'alg': 'EdDSA', 'typ': 'at+jwt', 'kid': 'fuzz'})}.{segment(claims)}"
    token = f"{signing_input}.{b64(FUZZ_SIGNER.key.sign(signing_input.encode()))}"
    verifier = Verifier(StaticKeys(jwks_of(FUZZ_SIGNER)), SETTINGS)
    try:
        principal = await verifier.verify(token)
    except InvalidToken:
        return
    assert principal.subject == claims["sub"]
    assert principal.scopes == set(claims["scope"].split())
