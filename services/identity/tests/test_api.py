from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tributary.testkit.infra import Found

from .support import Identity, identity_service, sign_up_body, unique_email
from .test_handlers import payment_succeeded, subscription_cancelled


@pytest.fixture(scope="module")
async def identity(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found
) -> AsyncIterator[Identity]:
    db = tmp_path_factory.mktemp("identity") / "identity.db"
    async with identity_service(rabbitmq.url, f"sqlite+aiosqlite:///{db}") as service:
        assert (await service.client.get("/health/ready")).json()["status"] == "ready"
        yield service


async def test_a_sign_up_is_stored_and_announced_once(identity: Identity) -> None:
    body = sign_up_body(email=unique_email("Example.COM"), plan="starter", locale="fr-FR")
    response = await identity.client.post("/users", json=body)

    assert response.status_code == 201
    user = response.json()
    assert re.fullmatch(r"usr_[A-Za-z0-9]{8,40}", user["id"])
    assert (user["email"], user["plan"], user["locale"], user["role"]) == (
        body["email"],
        "starter",
        "fr-FR",
        "member",
    )
    assert (await identity.client.get(f"/users/{user['id']}")).json() == user
    [event] = await identity.events(user["id"])
    assert event["type"] == "com.tributary.user.created.v1"
    assert event["idempotencykey"] == f"user.created:{user['id']}"
    assert event["data"] == {
        "user_id": user["id"],
        "email": body["email"],
        "name": "Ada Lovelace",
        "plan": "starter",
        "locale": "fr-FR",
        "created_at": event["data"]["created_at"],
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "not-an-address"),
        ("name", ""),
        ("name", "n" * 201),
        ("plan", "enterprise"),
        ("locale", "english"),
    ],
)
async def test_an_invalid_sign_up_is_refused_naming_the_field(
    identity: Identity, field: str, value: str
) -> None:
    response = await identity.client.post("/users", json=sign_up_body(**{field: value}))

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["field"] == f"body.{field}"


async def test_an_unknown_user_is_not_found_naming_the_id(identity: Identity) -> None:
    response = await identity.client.get("/users/usr_nobody000000")

    assert response.status_code == 404
    problem = response.json()
    assert problem["type"] == "https://tributary.dev/problems/not-found"
    assert problem["errors"] == [
        {"field": "path.user_id", "message": "no such user", "type": "not_found"}
    ]
    assert "usr_nobody000000" in problem["detail"]


async def test_an_address_registered_before_in_any_letter_case_is_a_conflict(
    identity: Identity,
) -> None:
    first = await identity.sign_up()
    response = await identity.client.post(
        "/users", json=sign_up_body(email=first["email"].upper(), name="Someone Else")
    )

    assert response.status_code == 409
    assert response.json()["errors"] == [
        {"field": "body.email", "message": "is already registered", "type": "conflict"}
    ]
    assert first["email"].upper() not in response.text


async def test_a_sign_up_retried_with_its_idempotency_key_returns_the_same_user_once(
    identity: Identity,
) -> None:
    body = sign_up_body()
    key = {"Idempotency-Key": f"signup-{body['email']}"}
    first = await identity.client.post("/users", json=body, headers=key)
    retry = await identity.client.post("/users", json=body, headers=key)

    assert first.status_code == retry.status_code == 201
    assert retry.json()["id"] == first.json()["id"]
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert len(await identity.events(first.json()["id"])) == 1
    assert (await identity.client.post("/users", json=body)).status_code == 409
    reused = await identity.client.post("/users", json={**body, "name": "Other"}, headers=key)
    assert reused.status_code == 422
    assert reused.json()["errors"][0]["field"] == "header.Idempotency-Key"


async def test_concurrent_sign_ups_with_one_address_make_one_user(identity: Identity) -> None:
    body, keyed_body = sign_up_body(), sign_up_body()
    key = {"Idempotency-Key": f"twins-{keyed_body['email']}"}
    twins = await asyncio.gather(*(identity.client.post("/users", json=body) for _ in range(2)))
    retries = await asyncio.gather(
        *(identity.client.post("/users", json=keyed_body, headers=key) for _ in range(2))
    )

    assert sorted(r.status_code for r in twins) == [201, 409]
    assert [r.status_code for r in retries] == [201, 201]
    assert retries[0].json()["id"] == retries[1].json()["id"]
    assert len(await identity.events(retries[0].json()["id"])) == 1


async def test_a_new_email_is_announced_with_the_old_and_the_new_address(
    identity: Identity,
) -> None:
    user = await identity.sign_up()
    new_email = unique_email()
    response = await identity.client.patch(f"/users/{user['id']}", json={"email": new_email})

    assert response.status_code == 200
    assert response.json()["email"] == new_email
    [event] = await identity.events(user["id"], "user.email_changed.v1")
    assert (event["data"]["old_email"], event["data"]["new_email"]) == (user["email"], new_email)
    assert event["subject"] == f"users/{user['id']}"


async def test_an_update_that_changes_no_address_announces_nothing(identity: Identity) -> None:
    user = await identity.sign_up()
    same = await identity.client.patch(
        f"/users/{user['id']}", json={"email": user["email"], "locale": user["locale"]}
    )
    renamed = await identity.client.patch(f"/users/{user['id']}", json={"name": "Ada King"})

    assert same.status_code == renamed.status_code == 200
    assert renamed.json()["name"] == "Ada King"
    assert await identity.events(user["id"], "user.email_changed.v1") == []


async def test_taking_another_users_address_is_a_conflict(identity: Identity) -> None:
    ada, grace = await identity.sign_up(), await identity.sign_up()
    response = await identity.client.patch(
        f"/users/{grace['id']}", json={"email": ada["email"].title()}
    )

    assert response.status_code == 409
    assert response.json()["errors"][0]["field"] == "body.email"
    assert (await identity.client.get(f"/users/{grace['id']}")).json()["email"] == grace["email"]
    assert await identity.events(grace["id"], "user.email_changed.v1") == []


async def test_an_update_refuses_null_and_read_only_fields_by_name(identity: Identity) -> None:
    user = await identity.sign_up()
    nulled = await identity.client.patch(f"/users/{user['id']}", json={"name": None})
    planned = await identity.client.patch(f"/users/{user['id']}", json={"plan": "pro"})

    assert nulled.status_code == planned.status_code == 422
    assert nulled.json()["errors"][0]["field"] == "body.name"
    assert planned.json()["errors"][0]["field"] == "body.plan"


async def test_a_role_change_is_announced_once(identity: Identity) -> None:
    user = await identity.sign_up()
    first = await identity.client.put(f"/users/{user['id']}/role", json={"role": "admin"})
    again = await identity.client.put(f"/users/{user['id']}/role", json={"role": "admin"})

    assert first.status_code == again.status_code == 200
    assert again.json()["role"] == "admin"
    [event] = await identity.events(user["id"], "role.changed.v1")
    assert (event["data"]["old_role"], event["data"]["new_role"]) == ("member", "admin")
    bad = await identity.client.put(f"/users/{user['id']}/role", json={"role": "god"})
    assert (bad.status_code, bad.json()["errors"][0]["field"]) == (422, "body.role")
    missing = await identity.client.put("/users/usr_nobody000000/role", json={"role": "admin"})
    assert (missing.status_code, missing.json()["errors"][0]["field"]) == (404, "path.user_id")


async def test_api_keys_are_listed_without_secrets_and_revoked_once(identity: Identity) -> None:
    user = await identity.sign_up()
    issued = await identity.client.post(f"/users/{user['id']}/api-keys", json={"name": "ci"})
    unnamed = await identity.client.post(f"/users/{user['id']}/api-keys")

    assert issued.status_code == unnamed.status_code == 201
    key = issued.json()
    assert re.fullmatch(r"key_[A-Za-z0-9]{8,40}", key["id"])
    assert key["secret"].startswith("trib_")
    listed = await identity.client.get(f"/users/{user['id']}/api-keys")
    assert [(k["id"], k["name"]) for k in listed.json()] == [
        (key["id"], "ci"),
        (unnamed.json()["id"], None),
    ]
    assert key["secret"] not in listed.text
    assert "secret" not in listed.text

    assert (await identity.client.delete(f"/api-keys/{key['id']}")).status_code == 204
    assert (await identity.client.delete(f"/api-keys/{key['id']}")).status_code == 204
    [event] = await identity.events(user["id"], "api_key.revoked.v1")
    assert event["data"]["api_key_id"] == key["id"]
    assert event["idempotencykey"] == f"api_key.revoked:{key['id']}"
    revoked = {
        k["id"]: k["revoked_at"]
        for k in (await identity.client.get(f"/users/{user['id']}/api-keys")).json()
    }
    assert revoked[key["id"]] is not None
    assert revoked[unnamed.json()["id"]] is None


async def test_api_keys_of_unknown_users_and_unknown_keys_are_not_found(
    identity: Identity,
) -> None:
    assert (await identity.client.post("/users/usr_nobody000000/api-keys")).status_code == 404
    assert (await identity.client.get("/users/usr_nobody000000/api-keys")).status_code == 404
    response = await identity.client.delete("/api-keys/key_nobody000000")
    assert (response.status_code, response.json()["errors"][0]["field"]) == (404, "path.key_id")


async def test_a_sign_up_reaches_the_exchange_as_a_cloudevent_with_the_callers_correlation_id(
    identity: Identity,
) -> None:
    response = await identity.client.post(
        "/users", json=sign_up_body(), headers={"X-Correlation-ID": "signup-test-1"}
    )
    user_id = response.json()["id"]

    message = await identity.broker.wait_for(lambda e: e.get("subject") == f"users/{user_id}")
    event = json.loads(message.body)
    assert message.routing_key == "user.created.v1"
    assert message.content_type == "application/cloudevents+json"
    assert (message.message_id, message.type, message.app_id) == (
        event["id"],
        "com.tributary.user.created.v1",
        "identity",
    )
    assert event["correlationid"] == message.correlation_id == "signup-test-1"
    assert event["data"]["user_id"] == user_id


async def test_a_payment_from_billing_activates_the_paid_plan(identity: Identity) -> None:
    user = await identity.sign_up()
    payment = payment_succeeded(user["id"], "pay_apitest0001", plan="pro")
    await identity.publish(payment)

    await identity.outcomes.wait_until_handled(payment.id)
    assert (await identity.client.get(f"/users/{user['id']}")).json()["plan"] == "pro"
    message = await identity.broker.wait_for(
        lambda e: (
            e["type"].endswith("subscription.activated.v1") and e["data"]["user_id"] == user["id"]
        )
    )
    event = json.loads(message.body)
    assert event["data"]["payment_id"] == "pay_apitest0001"
    assert event["causationid"] == payment.id


async def test_billing_hears_why_identity_will_not_activate_and_a_cancellation_reverts(
    identity: Identity,
) -> None:
    """The saga's side in identity, through the broker: an unknown user and a duplicate
    purchase are rejected (``subscription.activation_rejected``, nothing dead-lettered); a
    ``subscription.cancelled`` takes the plan back, and one for a payment not yet seen leaves
    a tombstone that its late ``payment.succeeded`` cannot get past."""

    def rejection_of(payment_id: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: (
            e["type"].endswith("subscription.activation_rejected.v1")
            and e["data"]["payment_id"] == payment_id
        )

    unknown = payment_succeeded("usr_nobody000000", "pay_apitest0002")
    await identity.publish(unknown)
    await identity.outcomes.wait_until_handled(unknown.id)
    message = await identity.broker.wait_for(rejection_of("pay_apitest0002"))
    event = json.loads(message.body)
    assert (event["data"]["reason"], event["causationid"]) == ("unknown_user", unknown.id)

    user = await identity.sign_up()
    first = payment_succeeded(user["id"], "pay_apitest0003", plan="starter")
    duplicate = payment_succeeded(user["id"], "pay_apitest0004", plan="starter")
    for payment in (first, duplicate):
        await identity.publish(payment)
        await identity.outcomes.wait_until_handled(payment.id)
    message = await identity.broker.wait_for(rejection_of("pay_apitest0004"))
    assert json.loads(message.body)["data"]["reason"] == "already_subscribed"
    assert (await identity.client.get(f"/users/{user['id']}")).json()["plan"] == "starter"

    # billing compensated the first one (its activation came too late): the plan goes back
    cancelled = subscription_cancelled(user["id"], "pay_apitest0003", "starter")
    await identity.publish(cancelled)
    await identity.outcomes.wait_until_handled(cancelled.id)
    assert (await identity.client.get(f"/users/{user['id']}")).json()["plan"] == "free"
    # cancelled before identity saw the payment: the payment activates nothing afterwards
    early = subscription_cancelled(user["id"], "pay_apitest0005", "pro")
    late = payment_succeeded(user["id"], "pay_apitest0005", plan="pro")
    for event_ in (early, late):
        await identity.publish(event_)
        await identity.outcomes.wait_until_handled(event_.id)
    assert (await identity.client.get(f"/users/{user['id']}")).json()["plan"] == "free"
    activations = await identity.events(user["id"], "subscription.activated.v1")
    assert [e["data"]["payment_id"] for e in activations] == ["pay_apitest0003"]
    assert await identity.events(user["id"], "subscription.activation_rejected.v1") == [
        json.loads(message.body)
    ]
