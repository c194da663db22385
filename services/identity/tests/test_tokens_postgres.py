from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import jwt
import pytest
from sqlmodel import select

from tributary.identity.bootstrap import ADMIN_USER_ID, register_bootstrap_admin
from tributary.identity.models import ApiKey, SigningKey, User
from tributary.identity.signing import SigningKeys
from tributary.messaging.db import create_engine, session_factory
from tributary.service import migrations
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

from .support import identity_service
from .test_tokens import (
    ADMIN_SECRET,
    MIGRATIONS,
    activate_now,
    bearer,
    jwks_kids,
    token,
    verified,
    with_bootstrap,
)


@pytest.mark.postgres
async def test_two_replicas_starting_at_once_share_one_key_and_verify_each_others_tokens(
    rabbitmq: Found, postgres: Found
) -> None:
    name = f"identity_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(postgres.url, name)
    try:
        await migrations.upgrade(MIGRATIONS, url)
        # what two replicas' start-ups do, at the same moment, on their own connections
        engines = [create_engine(url) for _ in range(2)]
        try:
            stores = [
                SigningKeys(session_factory(e), published_for=timedelta(minutes=5)) for e in engines
            ]
            first, second = await asyncio.gather(*(s.ensure_active() for s in stores))
            assert first.kid == second.kid
            await asyncio.gather(
                *(register_bootstrap_admin(session_factory(e), ADMIN_SECRET) for e in engines)
            )
            async with session_factory(engines[0])() as session:
                assert len((await session.exec(select(SigningKey))).all()) == 1
                assert len((await session.exec(select(ApiKey))).all()) == 1
                assert len((await session.exec(select(User))).all()) == 1
        finally:
            for engine in engines:
                await engine.dispose()

        settings = with_bootstrap(ADMIN_SECRET)
        async with (
            identity_service(rabbitmq.url, url, settings=settings, trust_test_tokens=False) as a,
            identity_service(rabbitmq.url, url, settings=settings, trust_test_tokens=False) as b,
        ):
            from_a = await token(a.client, ADMIN_SECRET)
            assert jwt.get_unverified_header(from_a)["kid"] == first.kid
            answer = await b.client.get(f"/users/{ADMIN_USER_ID}", headers=bearer(from_a))
            assert answer.status_code == 200, answer.text

            rotated = await b.client.post("/signing-keys/rotate", headers=bearer(from_a))
            assert rotated.status_code == 201, rotated.text
            new_kid = rotated.json()["kid"]
            await activate_now(b.app, new_kid)  # not waiting out the publication lead

            # a signs with the key b made, publishes it, and each verifies the other's tokens
            new_from_a = await token(a.client, ADMIN_SECRET)
            assert jwt.get_unverified_header(new_from_a)["kid"] == new_kid
            assert await jwks_kids(a.client) == [new_kid, first.kid]
            for replica in (a, b):
                for access_token in (from_a, new_from_a):
                    answer = await replica.client.get(
                        f"/users/{ADMIN_USER_ID}", headers=bearer(access_token)
                    )
                    assert answer.status_code == 200, answer.text
            assert (await verified(b.client, new_from_a))["sub"] == ADMIN_USER_ID
    finally:
        await drop_postgres_database(postgres.url, name)
