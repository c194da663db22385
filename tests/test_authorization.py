"""The authorization matrix: every route of every service by every kind of caller.

Each service runs in-process on SQLite against the real broker and trusts a test token
minter (``running(app)``), so any caller can be played: no token, an expired token, one for
another audience, one lacking the route's scope, another user, the resource's owner and an
admin. A route added without an access rule, or without a row here, fails the test.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI

from tributary.audit.app import create_app as audit_app
from tributary.audit.settings import Settings as AuditSettings
from tributary.billing import crypto
from tributary.billing.app import create_app as billing_app
from tributary.billing.settings import Settings as BillingSettings
from tributary.billing.subscription import Subscription
from tributary.email.app import create_app as email_app
from tributary.email.settings import Settings as EmailSettings
from tributary.identity.app import create_app as identity_app
from tributary.identity.settings import Settings as IdentitySettings
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import delete_prefixed, isolated_settings
from tributary.notification import tokens as unsubscribe_tokens
from tributary.notification.app import create_app as notification_app
from tributary.notification.settings import Settings as NotificationSettings
from tributary.notification.webhook_models import WebhookDelivery, WebhookEndpoint
from tributary.notification.webhooks import new_endpoint_id, new_message_id, new_secret
from tributary.onboarding.app import create_app as onboarding_app
from tributary.onboarding.models import Workspace
from tributary.onboarding.settings import Settings as OnboardingSettings
from tributary.payment_provider.app import create_app as provider_app
from tributary.payment_provider.testing import TEST_API_KEY, provider_settings, served
from tributary.service.auth import ADMIN_SCOPES, SELF_SCOPES, rules_by_route
from tributary.service.testing import TokenMinter, minter, running
from tributary.testkit.infra import Found
from tributary.testkit.processes import free_port

Caller = Literal["none", "expired", "wrong_audience", "wrong_scope", "other", "owner", "admin"]
CALLERS: tuple[Caller, ...] = (
    "none",
    "expired",
    "wrong_audience",
    "wrong_scope",
    "other",
    "owner",
    "admin",
)

Kind = Literal["public", "self", "self_hidden", "admin"]
"""public: anyone; self: the owner or an admin, another user 403; self_hidden: the same but
another user's resource answers 404 as if absent; admin: admin scopes only."""


@dataclass(frozen=True)
class Call:
    """How to call a route for one caller: ``{owner}``, ``{key}``, ``{workspace}``,
    ``{unsubscribe}`` (an unsubscribe token of the owner's), ``{webhook}`` and ``{delivery}``
    (a webhook endpoint of the owner's and a delivery of it), ``{subscription}`` (a
    subscription of the owner's, not paid) filled in.

    The payment provider (services/payment-provider) is not in the matrix: it stands in for an
    external system and authenticates merchants by its own API keys, not identity's tokens
    (its routes are tested in its package's test_auth.py)."""

    kind: Kind
    path: str
    ok: int
    """The status when authorized."""
    json: dict[str, Any] | None = None
    params: dict[str, str] | None = None
    data: dict[str, str] | None = None
    with_bearer: int | None = None
    """A public route's status when a bearer token is sent anyway, if it differs."""


ROUTES: dict[tuple[str, str, str], Call] = {
    # identity
    ("identity", "POST", "/users"): Call("public", "/users", 201, json={"locale": "en-GB"}),
    ("identity", "GET", "/users/{user_id}"): Call("self", "/users/{owner}", 200),
    ("identity", "PATCH", "/users/{user_id}"): Call(
        "self", "/users/{owner}", 200, json={"name": "Renamed"}
    ),
    ("identity", "DELETE", "/users/{user_id}"): Call("self", "/users/{owner}", 204),
    ("identity", "PUT", "/users/{user_id}/role"): Call(
        "admin", "/users/{owner}/role", 200, json={"role": "admin"}
    ),
    ("identity", "POST", "/users/{user_id}/api-keys"): Call(
        "self", "/users/{owner}/api-keys", 201, json={"name": "ci"}
    ),
    ("identity", "GET", "/users/{user_id}/api-keys"): Call("self", "/users/{owner}/api-keys", 200),
    ("identity", "DELETE", "/api-keys/{key_id}"): Call("self_hidden", "/api-keys/{key}", 204),
    ("identity", "POST", "/oauth/token"): Call(
        # no client credentials: 400; a bearer token is no client authentication: 401
        "public",
        "/oauth/token",
        400,
        data={"grant_type": "client_credentials"},
        with_bearer=401,
    ),
    ("identity", "GET", "/.well-known/jwks.json"): Call("public", "/.well-known/jwks.json", 200),
    ("identity", "POST", "/signing-keys/rotate"): Call("admin", "/signing-keys/rotate", 201),
    # onboarding
    ("onboarding", "GET", "/workspaces"): Call(
        "self", "/workspaces", 200, params={"owner_id": "{owner}"}
    ),
    ("onboarding", "GET", "/workspaces/{workspace_id}"): Call(
        "self_hidden", "/workspaces/{workspace}", 200
    ),
    # email
    ("email", "GET", "/emails"): Call("admin", "/emails", 200, params={"to": "a@example.com"}),
    ("email", "GET", "/emails/{email_id}"): Call("admin", "/emails/eml_absent", 404),
    # audit
    ("audit", "GET", "/audit"): Call("admin", "/audit", 200),
    ("audit", "GET", "/audit/verify"): Call("admin", "/audit/verify", 200),
    ("audit", "GET", "/audit/checkpoints"): Call("admin", "/audit/checkpoints", 200),
    ("audit", "GET", "/audit/checkpoints/key"): Call("public", "/audit/checkpoints/key", 200),
    ("audit", "GET", "/audit/timeline"): Call(
        "admin", "/audit/timeline", 200, params={"correlation_id": "no-such-request"}
    ),
    # the timeline page and its files hold no data; the login's body is validated before
    # identity is asked (an empty one: 422), a bearer token changes nothing
    ("audit", "GET", "/audit/ui"): Call("public", "/audit/ui", 200),
    ("audit", "GET", "/audit/ui/app.js"): Call("public", "/audit/ui/app.js", 200),
    ("audit", "GET", "/audit/ui/app.css"): Call("public", "/audit/ui/app.css", 200),
    ("audit", "POST", "/audit/ui/login"): Call("public", "/audit/ui/login", 422, json={}),
    # notification
    ("notification", "GET", "/users/{user_id}/preferences"): Call(
        "self", "/users/{owner}/preferences", 200
    ),
    ("notification", "PUT", "/users/{user_id}/preferences"): Call(
        "self",
        "/users/{owner}/preferences",
        200,
        json={"categories": {"reports": {"email": False}}},
    ),
    ("notification", "GET", "/users/{user_id}/notifications"): Call(
        "self", "/users/{owner}/notifications", 200
    ),
    ("notification", "POST", "/users/{user_id}/notifications/{notification_id}/read"): Call(
        "self",
        "/users/{owner}/notifications/1/read",
        404,  # the new owner has none yet
    ),
    ("notification", "POST", "/users/{user_id}/notifications/read-all"): Call(
        "self", "/users/{owner}/notifications/read-all", 200
    ),
    # a stream never ends by itself: an invalid position turns the authorized answer into a
    # 422 (the stream is tested through uvicorn in services/notification/tests)
    ("notification", "GET", "/users/{user_id}/notifications/stream"): Call(
        "self", "/users/{owner}/notifications/stream", 422, params={"after": "-1"}
    ),
    # the token in the link is the credential; a bearer token changes nothing
    ("notification", "GET", "/unsubscribe"): Call(
        "public", "/unsubscribe", 200, params={"token": "{unsubscribe}"}
    ),
    ("notification", "POST", "/unsubscribe"): Call(
        "public", "/unsubscribe", 200, params={"token": "{unsubscribe}"}
    ),
    # webhooks: {webhook} is an endpoint of the owner's with one delivery, {delivery}
    ("notification", "POST", "/users/{user_id}/webhooks"): Call(
        "self", "/users/{owner}/webhooks", 201, json={"url": "https://93.184.216.34/hook"}
    ),
    ("notification", "GET", "/users/{user_id}/webhooks"): Call(
        "self", "/users/{owner}/webhooks", 200
    ),
    ("notification", "GET", "/users/{user_id}/webhooks/{webhook_id}"): Call(
        "self", "/users/{owner}/webhooks/{webhook}", 200
    ),
    ("notification", "PATCH", "/users/{user_id}/webhooks/{webhook_id}"): Call(
        "self", "/users/{owner}/webhooks/{webhook}", 200, json={"description": "renamed"}
    ),
    ("notification", "DELETE", "/users/{user_id}/webhooks/{webhook_id}"): Call(
        "self", "/users/{owner}/webhooks/{webhook}", 204
    ),
    ("notification", "POST", "/users/{user_id}/webhooks/{webhook_id}/rotate-secret"): Call(
        "self", "/users/{owner}/webhooks/{webhook}/rotate-secret", 200
    ),
    ("notification", "GET", "/users/{user_id}/webhooks/{webhook_id}/deliveries"): Call(
        "self", "/users/{owner}/webhooks/{webhook}/deliveries", 200
    ),
    (
        "notification",
        "POST",
        "/users/{user_id}/webhooks/{webhook_id}/deliveries/{delivery_id}/resend",
    ): Call("self", "/users/{owner}/webhooks/{webhook}/deliveries/{delivery}/resend", 202),
    # billing: {subscription} is a subscription of the owner's (requested, not paid)
    ("billing", "POST", "/subscriptions"): Call(
        "self", "/subscriptions", 201, json={"plan": "starter", "user_id": "{owner}"}
    ),
    ("billing", "GET", "/subscriptions"): Call(
        "self", "/subscriptions", 200, params={"user_id": "{owner}"}
    ),
    ("billing", "GET", "/subscriptions/{subscription_id}"): Call(
        "self_hidden", "/subscriptions/{subscription}", 200
    ),
    ("billing", "POST", "/subscriptions/{subscription_id}/cancel"): Call(
        "self_hidden", "/subscriptions/{subscription}/cancel", 200
    ),
    ("billing", "GET", "/revenue"): Call("admin", "/revenue", 200),
    ("billing", "GET", "/sagas/{subscription_id}"): Call("admin", "/sagas/{subscription}", 200),
    ("billing", "GET", "/sagas"): Call(
        "admin", "/sagas", 200, params={"state": "awaiting_payment"}
    ),
    # the provider's signature is the credential: unsigned, 401 whatever token comes along
    ("billing", "POST", "/webhooks/payments"): Call("public", "/webhooks/payments", 401, json={}),
}
for _service in ("identity", "onboarding", "email", "audit", "notification", "billing"):
    ROUTES[(_service, "GET", "/health/live")] = Call("public", "/health/live", 200)
    ROUTES[(_service, "GET", "/health/ready")] = Call("public", "/health/ready", 200)
    ROUTES[(_service, "GET", "/metrics")] = Call("public", "/metrics", 200)


def expected(call: Call, caller: Caller) -> int:
    if call.kind == "public":
        return call.ok if caller == "none" or call.with_bearer is None else call.with_bearer
    if caller in ("none", "expired", "wrong_audience"):
        return 401
    if caller == "wrong_scope":
        return 403
    if caller == "admin":
        return call.ok
    if caller == "owner":
        return 403 if call.kind == "admin" else call.ok
    return {"self": 403, "self_hidden": 404, "admin": 403}[call.kind]  # another user


@dataclass
class Services:
    apps: dict[str, FastAPI]
    clients: dict[str, httpx.AsyncClient]
    """Calling as an admin (for setting things up)."""
    bare: dict[str, httpx.AsyncClient]
    """Sending only the headers a test gives."""


def _apps(
    messaging: dict[str, MessagingSettings], db: dict[str, str], provider_url: str
) -> dict[str, FastAPI]:
    return {
        "identity": identity_app(IdentitySettings(database_url=db["i"], port=0), messaging["i"]),
        "onboarding": onboarding_app(
            OnboardingSettings(database_url=db["o"], port=0), messaging["o"]
        ),
        "email": email_app(
            EmailSettings(database_url=db["e"], port=0, smtp_port=free_port()), messaging["e"]
        ),
        "audit": audit_app(
            AuditSettings.model_validate(
                {
                    "AUDIT_DATABASE_URL": db["a"],
                    "AUDIT_PORT": 0,
                    # 32 raw bytes, base64: a fixed test key (nothing written under var/)
                    "AUDIT_SIGNING_KEY": "dGVzdC1vbmx5LWF1ZGl0LWNoZWNrcG9pbnQta2V5ISE=",
                }
            ),
            messaging["a"],
        ),
        "notification": notification_app(
            NotificationSettings.model_validate(
                {
                    "NOTIFICATION_DATABASE_URL": db["n"],
                    "NOTIFICATION_PORT": 0,
                    "NOTIFICATION_UNSUBSCRIBE_KEY": "authorization-test-key",
                }
            ),
            messaging["n"],
        ),
        "billing": billing_app(
            BillingSettings.model_validate(
                {
                    "BILLING_DATABASE_URL": db["b"],
                    "BILLING_PORT": 0,
                    "BILLING_PROVIDER_URL": provider_url,
                    "BILLING_PROVIDER_API_KEY": TEST_API_KEY,
                }
            ),
            messaging["b"],
        ),
    }


@pytest.fixture(scope="module")
async def services(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found
) -> AsyncIterator[Services]:
    workdir = tmp_path_factory.mktemp("authz")
    # each service on a bus of its own: no event crosses over, the test makes what it needs
    messaging = {n: isolated_settings(rabbitmq.url) for n in ("i", "o", "e", "a", "n", "b")}
    db = {n: f"sqlite+aiosqlite:///{workdir / n}.db" for n in ("i", "o", "e", "a", "n", "b", "p")}
    # billing makes checkouts at a real payment provider (its app behind uvicorn)
    provider_port = free_port()
    provider = provider_app(provider_settings(db["p"], None))
    with pytest.MonkeyPatch.context() as env:  # one test address signs up many users
        for name in ("SIGNUP", "TOKEN", "WRITES"):
            env.setenv(f"TRIBUTARY_RATE_{name}", "100000/minute")
        apps = _apps(messaging, db, f"http://127.0.0.1:{provider_port}")
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(served(provider, port=provider_port))
            clients = {
                name: await stack.enter_async_context(running(app)) for name, app in apps.items()
            }
            bare = {
                name: await stack.enter_async_context(
                    httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")
                )
                for name, app in apps.items()
            }
            yield Services(apps, clients, bare)
    finally:
        for service, app in apps.items():
            names, tiers = app.state.bus.names, len(messaging["a"].retry_tiers)
            qs = names.service_queues(service, tiers)
            # the service's own queue set and one per command it handles (billing.saga...)
            queues = {qs.work, qs.dlq, *qs.retries, *app.state.bus.queue_names()}
            if service == "email":
                commands = names.command_queues("email.send", tiers)
                queues |= {commands.work, commands.dlq, *commands.retries}
            await delete_prefixed(rabbitmq.url, names, sorted(queues))


def _tokens(services: Services, service: str) -> TokenMinter:
    return minter(services.apps[service])


def _headers(
    services: Services, service: str, caller: Caller, owner: str, scope: str | None
) -> dict[str, str]:
    tokens = _tokens(services, service)
    everything = SELF_SCOPES | ADMIN_SCOPES
    if caller == "none":
        return {}
    if caller == "expired":
        token = tokens.token(owner, everything, exp=int(time.time()) - 3600)
    elif caller == "wrong_audience":
        token = tokens.token(owner, everything, aud="someone-else")
    elif caller == "wrong_scope":
        token = tokens.token(owner, everything - {scope} if scope else everything)
    elif caller == "other":
        return tokens.member("usr_someoneelse000000")
    elif caller == "owner":
        return tokens.member(owner)
    else:
        return tokens.headers()
    return {"Authorization": f"Bearer {token}"}


async def _resources(services: Services, n: int) -> dict[str, str]:
    """A fresh user (the owner), one of their API keys, their workspace, an unsubscribe
    token of theirs, and a webhook endpoint of theirs with a delivery."""
    identity = services.clients["identity"]
    body = {"email": f"owner{n}-{time.time_ns()}@example.com", "name": "Owner", "locale": "en-GB"}
    answer = await identity.post("/users", json=body)
    assert answer.status_code == 201, answer.text
    user = answer.json()
    key = (await identity.post(f"/users/{user['id']}/api-keys", json={})).json()
    sessions = services.apps["onboarding"].state.sessions
    async with sessions() as session:
        workspace = Workspace.for_owner(user["id"], "Owner's workspace")
        session.add(workspace)
        await session.commit()
    webhook, delivery = await _webhook(services, user["id"])
    subscription = await _subscription(services, user["id"])
    unsubscribe = unsubscribe_tokens.mint(
        user["id"],
        "mentions",
        key=services.apps["notification"].state.unsubscribe_key,
        ttl_seconds=600,
    )
    return {
        "owner": user["id"],
        "key": key["id"],
        "workspace": workspace.id,
        "unsubscribe": unsubscribe,
        "webhook": webhook,
        "delivery": delivery,
        "subscription": subscription,
    }


async def _subscription(services: Services, owner: str) -> str:
    """A subscription of ``owner``'s, requested and not paid (no checkout: none is needed)."""
    app = services.apps["billing"]
    billing = app.state.billing
    key = await crypto.ensure_key(app.state.sessions, owner)
    subscription = Subscription(f"sub_{time.time_ns()}")
    async with app.state.bus.unit_of_work() as uow:
        sealed = crypto.seal(key, owner, crypto.aad(subscription.id, "user"))
        decided = subscription.request(
            user=sealed, plan="starter", amount_cents=900, currency="EUR", at=datetime.now(UTC)
        )
        await billing.save(uow, subscription, decided)
        await uow.commit()
    return subscription.id


async def _webhook(services: Services, owner: str) -> tuple[str, str]:
    """A webhook endpoint of ``owner``'s with one delivery (to loopback, which the service
    refuses to call: a re-send stays local)."""
    endpoint = WebhookEndpoint(
        id=new_endpoint_id(), user_id=owner, url="https://127.0.0.1:9/hook", secret=new_secret()
    )
    delivery = WebhookDelivery(
        id=new_message_id(),
        endpoint_id=endpoint.id,
        user_id=owner,
        source=f"report.ready:rpt_{endpoint.id}",
        category="reports",
        event_id="evt-authorization",
        payload="{}",
        status="succeeded",
        next_attempt=None,
    )
    async with services.apps["notification"].state.sessions() as session:
        session.add(endpoint)
        session.add(delivery)
        await session.commit()
    return endpoint.id, delivery.id


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def test_every_route_has_a_rule_and_a_row(services: Services) -> None:
    found: set[tuple[str, str, str]] = set()
    for service, app in services.apps.items():
        for route, rule in rules_by_route(app).items():
            method, path = route.split(" ", 1)
            if method == "HEAD":
                continue
            assert rule is not None, f"{service} {route}: no access rule (require/public)"
            key = (service, method, path)
            found.add(key)
            assert key in ROUTES, f"{key}: no row in the authorization matrix"
            assert (ROUTES[key].kind == "public") == rule.public, f"{key}: the rule is {rule}"
    assert set(ROUTES) == found, f"rows for routes that do not exist: {set(ROUTES) - found}"


@pytest.mark.parametrize("caller", CALLERS)
async def test_matrix(services: Services, caller: Caller) -> None:
    wrong: list[str] = []
    for n, ((service, method, template), call) in enumerate(sorted(ROUTES.items())):
        names = await _resources(services, n)
        rule = rules_by_route(services.apps[service])[f"{method} {template}"]
        headers = _headers(services, service, caller, names["owner"], rule and rule.scope)
        body = _fill(call.json, names)
        if template == "/users" and body is not None:
            body = {**body, "email": f"new{n}-{time.time_ns()}@example.com", "name": "New"}
        response = await services.bare[service].request(
            method,
            _fill(call.path, names),
            headers=headers,
            json=body,
            params=_fill(call.params, names),
            data=call.data,
        )
        want = expected(call, caller)
        if response.status_code != want:
            wrong.append(f"{service} {method} {template}: {response.status_code}, want {want}")
        elif response.status_code in (401, 403) and call.kind != "public":
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert not wrong, "\n".join(wrong)
