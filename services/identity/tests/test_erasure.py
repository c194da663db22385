"""DELETE /users/{id}: identity forgets the user in one transaction and announces user.erased."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlmodel import col, select

from tributary.identity.bootstrap import ADMIN_EMAIL, ADMIN_USER_ID
from tributary.identity.models import ApiKey, SignUpKey, Subscription, User
from tributary.messaging.db import OutboxRow, now
from tributary.messaging.testing import publish_raw
from tributary.service.testing import minter
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

from .support import Identity, identity_service, sign_up_body, unique_email
from .test_handlers import payment_succeeded


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def identity(
    request: pytest.FixtureRequest, tmp_path: Path, rabbitmq: Found
) -> AsyncIterator[Identity]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'identity.db'}"
        async with identity_service(rabbitmq.url, url) as service:
            yield service
        return
    server: Found = request.getfixturevalue("postgres")
    name = f"identity_erase_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(server.url, name)
    try:
        async with identity_service(rabbitmq.url, url) as service:
            yield service
    finally:
        await drop_postgres_database(server.url, name)


async def dead_letters(identity: Identity) -> list[dict[str, Any]]:
    """The bodies in identity's DLQ (read, then handed back)."""
    bus = identity.app.state.bus
    dlq = bus.names.service_queues("identity", len(bus.settings.retry_tiers)).dlq
    connection = await aio_pika.connect(identity.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(dlq, ensure=False)
        found = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            found.append(json.loads(message.body))
        return found


async def rows_about(identity: Identity, user_id: str) -> dict[str, int]:
    async with identity.app.state.sessions() as session:
        counts = {
            "users": len((await session.exec(select(User).where(col(User.id) == user_id))).all()),
        }
        for name, model in (
            ("api_keys", ApiKey),
            ("sign-up keys", SignUpKey),
            ("subscriptions", Subscription),
        ):
            query = select(model).where(col(model.user_id) == user_id)  # type: ignore[attr-defined]
            counts[name] = len((await session.exec(query)).all())
    return counts


async def outbox_bodies(identity: Identity) -> list[str]:
    async with identity.app.state.sessions() as session:
        return [row.decode() for row in (await session.exec(select(OutboxRow.body))).all()]


async def test_erasing_a_user_deletes_every_row_about_them_and_announces_it_once(
    identity: Identity,
) -> None:
    first = unique_email()
    key = {"Idempotency-Key": uuid.uuid4().hex}
    signed = await identity.client.post("/users", json=sign_up_body(email=first), headers=key)
    user_id = signed.json()["id"]
    second = unique_email()
    patched = await identity.client.patch(f"/users/{user_id}", json={"email": second})
    assert patched.status_code == 200
    await identity.client.put(f"/users/{user_id}/role", json={"role": "admin"})
    issued = await identity.client.post(f"/users/{user_id}/api-keys", json={"name": "ci"})
    secret = issued.json()["secret"]
    payment = payment_succeeded(user_id, f"pay_{uuid.uuid4().hex[:12]}")
    await identity.publish(payment)
    await identity.outcomes.wait_until_handled(payment.id)
    # a message about the user in identity's DLQ, and one about someone else
    bad = json.loads(payment_succeeded(user_id, "pay_bad000000001").to_bytes())
    bad["data"]["amount_cents"] = 0
    other = json.loads(payment_succeeded("usr_nobody00000000", "pay_other0000001").to_bytes())
    other["data"]["amount_cents"] = 0
    names = identity.app.state.bus.names
    for invalid in (bad, other):
        await publish_raw(
            identity.rabbitmq_url,
            names,
            "payment.succeeded.v1",
            json.dumps(invalid).encode(),
            message_id=invalid["id"],
        )
    for event_id in (bad["id"], other["id"]):
        await identity.outcomes.wait_until_handled(event_id, "dead_lettered")
    assert await rows_about(identity, user_id) == {
        "users": 1,
        "api_keys": 1,
        "sign-up keys": 1,
        "subscriptions": 1,
    }
    someone = await identity.sign_up()

    tokens = minter(identity.app)
    forbidden = await identity.client.delete(
        f"/users/{user_id}", headers=tokens.member(someone["id"])
    )
    assert forbidden.status_code == 403
    erased = await identity.client.delete(f"/users/{user_id}", headers=tokens.member(user_id))
    assert erased.status_code == 204, erased.text

    assert await rows_about(identity, user_id) == dict.fromkeys(
        ("users", "api_keys", "sign-up keys", "subscriptions"), 0
    )
    assert (await identity.client.get(f"/users/{user_id}")).status_code == 404
    again = await identity.client.delete(f"/users/{user_id}")
    assert again.status_code == 404
    bodies = await outbox_bodies(identity)
    about = [json.loads(b) for b in bodies if user_id in b]
    assert [e["type"] for e in about] == ["com.tributary.user.erased.v1"]
    assert set(about[0]["data"]) == {"user_id", "erased_at"}
    assert not any(first in b or second in b for b in bodies)
    assert any(someone["id"] in b for b in bodies)  # other users' events stay
    message = await identity.broker.wait_for(lambda e: e["id"] == about[0]["id"])
    assert message.routing_key == "user.erased.v1"
    # identity handles its own user.erased: its DLQ loses the message about the user
    await identity.outcomes.wait_until_handled(about[0]["id"])
    assert [e["id"] for e in await dead_letters(identity)] == [other["id"]]
    # the user's API key is gone: no token can be obtained with it any more
    token = await identity.client.post(
        "/oauth/token", data={"grant_type": "client_credentials", "client_secret": secret}
    )
    assert token.status_code in (400, 401)
    assert token.json()["error"] == "invalid_client"
    # the address is free again: a new sign-up with it is a new user
    anew = await identity.client.post("/users", json=sign_up_body(email=first), headers=key)
    assert anew.status_code == 201
    assert anew.json()["id"] != user_id


async def test_a_built_in_account_is_not_a_person_and_cannot_be_erased(
    identity: Identity,
) -> None:
    async with identity.app.state.sessions() as session:
        stamp = now()
        session.add(
            User(
                id="usr_builtin",
                email="builtin@tributary.invalid",
                email_normalized="builtin@tributary.invalid",
                name="Built-in",
                plan="free",
                locale="en-GB",
                role="owner",
                created_at=stamp,
                updated_at=stamp,
            )
        )
        await session.commit()
    refused = await identity.client.delete("/users/usr_builtin")
    assert refused.status_code == 409
    assert (await identity.client.get("/users/usr_builtin")).status_code == 200


async def test_the_bootstrap_owner_cannot_be_erased(identity: Identity) -> None:
    """``usr_bootstrapadmin`` has the shape of a person's id but is configuration."""
    async with identity.app.state.sessions() as session:
        stamp = now()
        session.add(
            User(
                id=ADMIN_USER_ID,
                email=ADMIN_EMAIL,
                email_normalized=ADMIN_EMAIL,
                name="Bootstrap admin",
                plan="free",
                locale="en-GB",
                role="owner",
                created_at=stamp,
                updated_at=stamp,
            )
        )
        await session.commit()
    refused = await identity.client.delete(f"/users/{ADMIN_USER_ID}")
    assert refused.status_code == 409
    assert refused.json()["errors"][0]["field"] == "path.user_id"
