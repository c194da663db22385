from __future__ import annotations

import asyncio
import uuid

import pytest

from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

from .support import identity_service, sign_up_body, unique_email
from .test_handlers import payment_succeeded


@pytest.mark.postgres
async def test_sign_up_retry_conflict_email_and_role_changes_and_payment_work_on_postgresql(
    rabbitmq: Found, postgres: Found
) -> None:
    name = f"identity_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(postgres.url, name)
    try:
        async with identity_service(rabbitmq.url, url) as identity:
            body = sign_up_body()
            key = {"Idempotency-Key": uuid.uuid4().hex}
            first, retry = await asyncio.gather(
                *(identity.client.post("/users", json=body, headers=key) for _ in range(2))
            )
            assert first.status_code == retry.status_code == 201
            user = first.json()
            assert retry.json()["id"] == user["id"]
            shouting = sign_up_body(email=body["email"].upper())
            assert (await identity.client.post("/users", json=shouting)).status_code == 409

            new_email = unique_email()
            changed = await identity.client.patch(f"/users/{user['id']}", json={"email": new_email})
            assert changed.status_code == 200
            assert changed.json()["created_at"] == user["created_at"]
            role = await identity.client.put(f"/users/{user['id']}/role", json={"role": "owner"})
            assert role.json()["role"] == "owner"

            payment = payment_succeeded(user["id"], "pay_pgtest00001", plan="starter")
            await identity.publish(payment)
            await identity.outcomes.wait_until_handled(payment.id)
            assert (await identity.client.get(f"/users/{user['id']}")).json()["plan"] == "starter"

            events = await identity.events(user["id"])
            assert [e["type"].removeprefix("com.tributary.") for e in events] == [
                "user.created.v1",
                "user.email_changed.v1",
                "role.changed.v1",
                "subscription.activated.v1",
            ]
            assert events[1]["data"]["new_email"] == new_email
            await identity.broker.wait_for(lambda e: e["id"] == events[-1]["id"])
    finally:
        await drop_postgres_database(postgres.url, name)
