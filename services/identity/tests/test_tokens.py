"""Access tokens: the client-credentials grant, the JWKS, key rotation and the bootstrap admin.

The app here verifies tokens with its own signing keys (no test minter), so every bearer token
in these tests was issued by ``POST /oauth/token``.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
from alembic import command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError
from sqlalchemy import inspect
from sqlmodel import col, select

import tributary.identity
from tributary.identity.bootstrap import ADMIN_USER_ID, BOOTSTRAP_KEY_ID
from tributary.identity.models import ApiKey, SigningKey, User
from tributary.identity.settings import Settings
from tributary.identity.signing import SigningKeys, public_jwk
from tributary.messaging.db import create_engine, now
from tributary.service.auth import ADMIN_SCOPES, SELF_SCOPES, AuthSettings
from tributary.service.migrations import alembic_config, upgrade
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .support import Identity, identity_service

MIGRATIONS = Path(tributary.identity.__file__).parent / "migrations"
ERRORS = {
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_scope",
    "unsupported_grant_type",
}


def new_secret() -> str:
    return f"trib_{secrets.token_urlsafe(32)}"


ADMIN_SECRET = new_secret()


def with_bootstrap(secret: str) -> Settings:
    return Settings(bootstrap_admin_api_key=SecretStr(secret))


@pytest.fixture(scope="module")
async def identity(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found
) -> AsyncIterator[Identity]:
    db = tmp_path_factory.mktemp("identity-tokens") / "identity.db"
    async with identity_service(
        rabbitmq.url,
        f"sqlite+aiosqlite:///{db}",
        settings=with_bootstrap(ADMIN_SECRET),
        trust_test_tokens=False,
    ) as service:
        yield service


# -- helpers ---------------------------------------------------------------------------------


async def request_token(
    client: httpx.AsyncClient,
    secret: str,
    *,
    key_id: str | None = None,
    scope: str | None = None,
    grant_type: str = "client_credentials",
) -> httpx.Response:
    """With ``key_id``: HTTP Basic; without: the ``client_secret`` form field."""
    form = {"grant_type": grant_type}
    if scope is not None:
        form["scope"] = scope
    if key_id is None:
        return await client.post("/oauth/token", data={**form, "client_secret": secret})
    return await client.post("/oauth/token", data=form, auth=(key_id, secret))


async def token(client: httpx.AsyncClient, secret: str, **kwargs: Any) -> str:
    response = await request_token(client, secret, **kwargs)
    assert response.status_code == 200, response.text
    access_token: str = response.json()["access_token"]
    return access_token


def bearer(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}"}


async def admin(identity: Identity) -> dict[str, str]:
    return bearer(await token(identity.client, ADMIN_SECRET))


async def member_with_key(identity: Identity) -> tuple[dict[str, Any], dict[str, Any]]:
    """A signed-up user (role member) and an API key issued to it: (user, key with secret)."""
    user = await identity.sign_up()
    issued = await identity.client.post(
        f"/users/{user['id']}/api-keys", json={"name": "ci"}, headers=await admin(identity)
    )
    assert issued.status_code == 201, issued.text
    return user, issued.json()


async def verified(client: httpx.AsyncClient, access_token: str) -> dict[str, Any]:
    """The token's claims, checked against the JWKS identity serves (as any service would)."""
    jwks = (await client.get("/.well-known/jwks.json")).json()
    kid = jwt.get_unverified_header(access_token)["kid"]
    [jwk] = [k for k in jwks["keys"] if k["kid"] == kid]
    auth = AuthSettings()
    claims: dict[str, Any] = jwt.decode(
        access_token,
        jwt.PyJWK(jwk),
        algorithms=["EdDSA"],
        audience=auth.audience,
        issuer=auth.issuer,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti", "client_id"]},
    )
    return claims


def oauth_error(response: httpx.Response, error: str, status: int = 400) -> None:
    assert (response.status_code, response.json()["error"]) == (status, error), response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert isinstance(response.json()["error_description"], str)


# -- the grant -------------------------------------------------------------------------------


async def test_a_key_gets_a_token_with_http_basic_or_with_its_secret_alone(
    identity: Identity,
) -> None:
    user, key = await member_with_key(identity)
    basic = await request_token(identity.client, key["secret"], key_id=key["id"])
    form = await request_token(identity.client, key["secret"])

    for answer in (basic, form):
        assert answer.status_code == 200, answer.text
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["pragma"] == "no-cache"
        body = answer.json()
        assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
        assert (body["token_type"], body["expires_in"]) == ("Bearer", 300)
        assert set(body["scope"].split(" ")) == SELF_SCOPES

        access_token = body["access_token"]
        header = jwt.get_unverified_header(access_token)
        assert (header["alg"], header["typ"]) == ("EdDSA", "at+jwt")
        claims = await verified(identity.client, access_token)
        assert (claims["sub"], claims["client_id"]) == (user["id"], key["id"])
        assert claims["exp"] - claims["iat"] == 300
        assert claims["nbf"] == claims["iat"]
        assert abs(claims["iat"] - time.time()) < 60
        assert claims["scope"] == body["scope"]
    tokens = [a.json()["access_token"] for a in (basic, form)]
    ids = {(await verified(identity.client, t))["jti"] for t in tokens}
    assert len(ids) == 2


async def test_the_answer_carrying_a_new_secret_is_not_stored(identity: Identity) -> None:
    user = await identity.sign_up()
    issued = await identity.client.post(
        f"/users/{user['id']}/api-keys", headers=await admin(identity)
    )
    assert issued.status_code == 201
    assert issued.headers["cache-control"] == "no-store"


async def test_a_wrong_secret_an_unknown_key_and_a_revoked_key_are_invalid_client(
    identity: Identity,
) -> None:
    _, key = await member_with_key(identity)
    other = new_secret()

    basic_wrong = await request_token(identity.client, other, key_id=key["id"])
    oauth_error(basic_wrong, "invalid_client", 401)
    assert basic_wrong.headers["www-authenticate"].startswith("Basic")
    oauth_error(await request_token(identity.client, other), "invalid_client")
    unknown = await request_token(identity.client, key["secret"], key_id="key_nobody000000")
    oauth_error(unknown, "invalid_client", 401)
    mismatched = await identity.client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "key_nobody000000",
            "client_secret": key["secret"],
        },
    )
    oauth_error(mismatched, "invalid_client")
    assert basic_wrong.json() == unknown.json()  # nothing tells a wrong secret from no key

    issued_before = await token(identity.client, key["secret"])
    revoked = await identity.client.delete(f"/api-keys/{key['id']}", headers=await admin(identity))
    assert revoked.status_code == 204
    oauth_error(
        await request_token(identity.client, key["secret"], key_id=key["id"]),
        "invalid_client",
        401,
    )
    oauth_error(await request_token(identity.client, key["secret"]), "invalid_client")
    # a token obtained before stays valid until it expires (verified locally, by design)
    assert (await verified(identity.client, issued_before))["client_id"] == key["id"]


async def test_malformed_grants_are_rfc6749_errors(identity: Identity) -> None:
    _, key = await member_with_key(identity)
    client = identity.client

    unsupported = await request_token(client, key["secret"], grant_type="password")
    oauth_error(unsupported, "unsupported_grant_type")
    missing = await client.post("/oauth/token", data={"client_secret": key["secret"]})
    oauth_error(missing, "invalid_request")
    as_json = await client.post(
        "/oauth/token", json={"grant_type": "client_credentials", "client_secret": key["secret"]}
    )
    oauth_error(as_json, "invalid_request")
    repeated = await client.post(
        "/oauth/token",
        content="grant_type=client_credentials&grant_type=client_credentials",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=(key["id"], key["secret"]),
    )
    oauth_error(repeated, "invalid_request")
    both = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_secret": key["secret"]},
        auth=(key["id"], key["secret"]),
    )
    oauth_error(both, "invalid_request")
    nobody = await client.post("/oauth/token", data={"grant_type": "client_credentials"})
    oauth_error(nobody, "invalid_client")
    bearer_auth = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": "Bearer something"},
    )
    oauth_error(bearer_auth, "invalid_client", 401)


async def test_scopes_are_what_the_role_allows_narrowed_by_the_request(
    identity: Identity,
) -> None:
    user, key = await member_with_key(identity)
    client = identity.client

    narrowed = await request_token(client, key["secret"], scope="users:read  keys:write")
    assert narrowed.json()["scope"] == "keys:write users:read"
    claims = await verified(client, narrowed.json()["access_token"])
    assert claims["scope"] == "keys:write users:read"
    oauth_error(await request_token(client, key["secret"], scope="users:admin"), "invalid_scope")
    oauth_error(await request_token(client, key["secret"], scope="users:rread"), "invalid_scope")
    oauth_error(await request_token(client, key["secret"], scope=""), "invalid_scope")

    promoted = await client.put(
        f"/users/{user['id']}/role", json={"role": "owner"}, headers=await admin(identity)
    )
    assert promoted.status_code == 200, promoted.text
    owner = await request_token(client, key["secret"], key_id=key["id"])
    assert set(owner.json()["scope"].split(" ")) == SELF_SCOPES | ADMIN_SCOPES
    audit_only = await request_token(client, key["secret"], scope="audit:read")
    assert audit_only.json()["scope"] == "audit:read"


async def test_identity_verifies_its_own_tokens(identity: Identity) -> None:
    user, key = await member_with_key(identity)
    member = bearer(await token(identity.client, key["secret"]))

    assert (await identity.client.post("/signing-keys/rotate")).status_code == 401
    refused = await identity.client.post("/signing-keys/rotate", headers=member)
    assert refused.status_code == 403
    assert 'scope="signing-keys:write"' in refused.headers["www-authenticate"]
    own = await identity.client.get(f"/users/{user['id']}", headers=member)
    assert own.status_code == 200, own.text


async def test_the_jwks_is_public_cacheable_and_lists_ed25519_keys(identity: Identity) -> None:
    answer = await identity.client.get("/.well-known/jwks.json")

    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "public, max-age=10"
    [key, *_] = answer.json()["keys"]
    assert {k: key[k] for k in ("kty", "crv", "use", "alg")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "use": "sig",
        "alg": "EdDSA",
    }
    assert "d" not in key  # never the private half


# -- foreign input ---------------------------------------------------------------------------

PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # no lone surrogates


def maybe(*plausible: str) -> st.SearchStrategy[str | None]:
    """Left out, one of the plausible values (often), or any text."""
    return st.none() | st.sampled_from(plausible) | st.sampled_from(plausible) | ANY_TEXT


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Mostly forms of plausible, odd or repeated fields; sometimes random octets."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    candidates = {
        "grant_type": maybe("client_credentials", "client_credentials", "password", ""),
        "client_secret": maybe(ADMIN_SECRET, new_secret(), ""),
        "client_id": maybe(BOOTSTRAP_KEY_ID, "key_nobody000000"),
        "scope": maybe("users:read", "users:admin keys:write", "nope", " ", ""),
    }
    fields = [(name, value) for name, values in candidates.items() if (value := draw(values))]
    fields += draw(st.lists(st.tuples(ANY_TEXT, ANY_TEXT), max_size=2))  # unknown fields
    if fields and draw(st.integers(0, 5)) == 0:
        fields.append(draw(st.sampled_from(fields)))  # a repeated parameter
    fields = draw(st.permutations(fields))
    encoded = urlencode(fields)
    if draw(st.integers(0, 5)) == 0:  # a raw %-escape or octet thrown in
        encoded += draw(st.sampled_from(["%", "%zz", "&%ff", "&&=", "=x", "+", "\xe9"]))
    return encoded.encode()


@st.composite
def authorizations(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["none", "none", "basic", "basic-raw", "raw", "bootstrap"]))
    if kind == "none":
        return None
    if kind == "basic":
        return b"Basic " + base64.b64encode(draw(st.binary(max_size=60)))
    if kind == "basic-raw":
        return b"Basic " + draw(PRINTABLE).encode()
    if kind == "bootstrap":
        key_id = draw(st.sampled_from([BOOTSTRAP_KEY_ID, "", "key_bootstrap%20", ":"]))
        password = draw(st.sampled_from([ADMIN_SECRET, ADMIN_SECRET, "", "x"]))
        return b"Basic " + base64.b64encode(f"{key_id}:{password}".encode())
    return bytes(draw(st.lists(st.integers(0x20, 0xFF), max_size=60)))


FORM = "application/x-www-form-urlencoded"
CONTENT_TYPES = st.sampled_from(
    [
        FORM,
        FORM,
        FORM,
        f"{FORM}; charset=UTF-8",
        FORM.upper(),
        "application/json",
        "multipart/form-data; boundary=x",
        "",
    ]
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies(), authorization=authorizations(), content_type=CONTENT_TYPES)
async def test_any_token_request_gets_a_token_or_an_rfc6749_error(
    identity: Identity, body: bytes, authorization: bytes | None, content_type: str
) -> None:
    headers = {b"Content-Type": content_type.encode()} if content_type else {}
    if authorization is not None:
        headers[b"Authorization"] = authorization
    answer = await identity.client.post("/oauth/token", content=body, headers=headers)

    assert answer.status_code in (200, 400, 401), answer.text
    assert answer.headers["cache-control"] == "no-store"
    document = answer.json()
    event(f"{answer.status_code} {document.get('error', 'token')}")
    if answer.status_code == 200:
        assert document["token_type"] == "Bearer"
        return
    assert set(document) == {"error", "error_description"}
    assert document["error"] in ERRORS
    # RFC 6749 §5.2: the description is printable ASCII without quote or backslash
    assert all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in document["error_description"])
    if answer.status_code == 401:
        assert document["error"] == "invalid_client"
        assert answer.headers["www-authenticate"].startswith("Basic")


# -- rotation --------------------------------------------------------------------------------


async def test_the_signing_keys_migration_goes_down_and_up_again(tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'identity.db'}"

    async def tables() -> set[str]:
        engine = create_engine(database)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        finally:
            await engine.dispose()

    await upgrade(MIGRATIONS, database)
    assert "signing_keys" in await tables()
    await asyncio.to_thread(command.downgrade, alembic_config(MIGRATIONS, database), "0002")
    assert "signing_keys" not in await tables()
    await upgrade(MIGRATIONS, database)
    assert "signing_keys" in await tables()


def test_a_key_id_is_the_rfc7638_thumbprint_of_its_public_key() -> None:
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"  # RFC 8037 appendix A.3
    public_key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "="))

    assert public_jwk(public_key) == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": x,
        "kid": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k",
        "use": "sig",
        "alg": "EdDSA",
    }


async def jwks_kids(client: httpx.AsyncClient) -> list[str]:
    return [k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]]


async def activate_now(app: FastAPI, kid: str) -> None:
    """Move a rotated-in key's activation to now (instead of waiting out the lead)."""
    async with app.state.sessions() as session:
        key = await session.get(SigningKey, kid)
        assert key is not None
        key.activated_at = now()
        session.add(key)
        await session.commit()


async def test_a_rotation_signs_with_the_new_key_and_publishes_the_old_until_its_tokens_expire(
    tmp_path: Path, rabbitmq: Found
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'identity.db'}"
    async with identity_service(
        rabbitmq.url, database, settings=with_bootstrap(ADMIN_SECRET), trust_test_tokens=False
    ) as service:
        client = service.client
        keys: SigningKeys = service.app.state.signing_keys
        old_token = await token(client, ADMIN_SECRET)
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        assert await jwks_kids(client) == [old_kid]

        rotated = await client.post("/signing-keys/rotate", headers=bearer(old_token))

        assert rotated.status_code == 201, rotated.text
        rotation = rotated.json()
        new_kid = rotation["kid"]
        assert rotation["previous_kid"] == old_kid
        # published at once, signing only after the lead: every verifier can learn it first
        assert await jwks_kids(client) == [new_kid, old_kid]
        assert jwt.get_unverified_header(await token(client, ADMIN_SECRET))["kid"] == old_kid
        activates = datetime.fromisoformat(rotation["activated_at"])
        assert activates - now() > keys.lead - timedelta(seconds=5)
        await activate_now(service.app, new_kid)
        new_token = await token(client, ADMIN_SECRET)
        assert jwt.get_unverified_header(new_token)["kid"] == new_kid != old_kid
        assert await jwks_kids(client) == [new_kid, old_kid]
        for access_token in (old_token, new_token):
            assert (await verified(client, access_token))["sub"] == ADMIN_USER_ID
            answer = await client.get(f"/users/{ADMIN_USER_ID}", headers=bearer(access_token))
            assert answer.status_code == 200, answer.text

        # every token of the old key has expired (lifetime + leeway): it leaves the JWKS
        auth = AuthSettings()
        lifetime = timedelta(seconds=auth.token_ttl_seconds + auth.leeway_seconds)
        assert keys.published_for == lifetime
        still = now() + lifetime - timedelta(seconds=2)
        keys.clock = lambda: still
        assert await jwks_kids(client) == [new_kid, old_kid]
        later = now() + lifetime + timedelta(seconds=1)
        keys.clock = lambda: later

        async def old_key_gone() -> bool:
            return await jwks_kids(client) == [new_kid]

        await eventually(old_key_gone, timeout=10, what="the old key to leave the JWKS")
        async with service.app.state.sessions() as session:
            old = await session.get(SigningKey, old_kid)
        assert old is not None
        assert old.retired_at is not None
        assert old.private_key_pem is None  # its private half is erased


# -- bootstrap -------------------------------------------------------------------------------


async def test_an_invalid_bootstrap_secret_is_refused_at_start_up_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as refused:
        with_bootstrap("hunter2-but-longer")

    assert "BOOTSTRAP_ADMIN_API_KEY must look like" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    assert Settings(bootstrap_admin_api_key="").bootstrap_admin_api_key is None  # type: ignore[arg-type]


async def test_the_bootstrap_key_is_registered_once_and_replaced_by_a_new_secret(
    tmp_path: Path, rabbitmq: Found
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'identity.db'}"
    first, second = new_secret(), new_secret()

    for _ in range(2):  # a restart with the same secret changes nothing
        async with identity_service(
            rabbitmq.url, database, settings=with_bootstrap(first), trust_test_tokens=False
        ) as service:
            answer = await request_token(service.client, first, key_id=BOOTSTRAP_KEY_ID)
            assert answer.status_code == 200, answer.text
            assert set(answer.json()["scope"].split(" ")) == SELF_SCOPES | ADMIN_SCOPES
            claims = await verified(service.client, answer.json()["access_token"])
            assert (claims["sub"], claims["client_id"]) == (ADMIN_USER_ID, BOOTSTRAP_KEY_ID)
            async with service.app.state.sessions() as session:
                keys = (await session.exec(select(ApiKey))).all()
                users = (await session.exec(select(User))).all()
            assert [(k.id, k.user_id, k.name) for k in keys] == [
                (BOOTSTRAP_KEY_ID, ADMIN_USER_ID, "bootstrap")
            ]
            assert [(u.id, u.role, u.email) for u in users] == [
                (ADMIN_USER_ID, "owner", "admin@tributary.invalid")
            ]
            assert await service.events(ADMIN_USER_ID) == []  # no sign-up announced

    async with identity_service(
        rabbitmq.url, database, settings=with_bootstrap(second), trust_test_tokens=False
    ) as service:
        oauth_error(await request_token(service.client, first), "invalid_client")
        owner = bearer(await token(service.client, second))
        async with service.app.state.sessions() as session:
            count = len((await session.exec(select(col(ApiKey.id)))).all())
        assert count == 1
        revoked = await service.client.delete(f"/api-keys/{BOOTSTRAP_KEY_ID}", headers=owner)
        assert revoked.status_code == 204, revoked.text

    # a revocation outlives a restart with the same secret; a new secret re-enables the key
    async with identity_service(
        rabbitmq.url, database, settings=with_bootstrap(second), trust_test_tokens=False
    ) as service:
        oauth_error(await request_token(service.client, second), "invalid_client")
    third = new_secret()
    async with identity_service(
        rabbitmq.url, database, settings=with_bootstrap(third), trust_test_tokens=False
    ) as service:
        assert (await request_token(service.client, third)).status_code == 200
