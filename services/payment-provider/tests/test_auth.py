"""Who may call what: the merchant's routes need an API key, paying needs only the checkout
id, health is open. (The provider is no Tributary service: it is outside the bearer-token
authorization matrix of tests/test_authorization.py, and tested here instead.)"""

from __future__ import annotations

import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from tributary.payment_provider.app import create_app
from tributary.payment_provider.auth import api_key
from tributary.payment_provider.testing import TEST_API_KEY, provider_settings, running_provider

PUBLIC = {
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("POST", "/checkouts/{checkout_id}/pay"),
}


def test_every_route_but_health_and_paying_needs_the_api_key() -> None:
    app = create_app(provider_settings("sqlite+aiosqlite://", None))

    def calls(dependant: Dependant) -> set[object]:
        return {dependant.call}.union(*(calls(d) for d in dependant.dependencies))

    found = set()
    for route in iter_route_contexts(app.routes):
        if not isinstance(route.original_route, APIRoute):
            continue
        for method in route.methods or ():
            needs_key = api_key in calls(route.dependant)
            assert needs_key == ((method, route.path) not in PUBLIC), (method, route.path)
            found.add((method, route.path))
    assert found >= PUBLIC
    assert len(found) >= 9


@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        ({}, "Bearer"),
        ({"Authorization": "Bearer pp_wrong"}, 'Bearer error="invalid_token"'),
        ({"Authorization": f"Bearer {TEST_API_KEY}x"}, 'Bearer error="invalid_token"'),
        ({"Authorization": f"Basic {TEST_API_KEY}"}, "Bearer"),
    ],
)
async def test_the_merchant_api_refuses_without_a_valid_key(
    sqlite_url: str, headers: dict[str, str], challenge: str
) -> None:
    async with (
        running_provider(sqlite_url, None) as provider,
        httpx.AsyncClient(base_url=provider.url, headers=headers) as stranger,
    ):
        for method, path in (
            ("POST", "/checkouts"),
            ("GET", "/checkouts/chk_x"),
            ("POST", "/checkouts/chk_x/expire"),
            ("GET", "/payments/pi_x"),
            ("POST", "/payments/pi_x/refunds"),
            ("GET", "/webhook-messages"),
        ):
            answer = await stranger.request(method, path, json={})
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.headers["www-authenticate"] == challenge
            assert answer.headers["content-type"].startswith("application/problem+json")
        assert (await stranger.get("/health/ready")).status_code == 200
        paid = await stranger.post("/checkouts/chk_absent/pay", json={"outcome": "succeed"})
        assert paid.status_code == 404


async def test_several_keys_are_active_at_once_while_one_is_rotated(sqlite_url: str) -> None:
    keys = {"PAYMENT_PROVIDER_API_KEYS": ["pp_old_key_0001", "pp_new_key_0002"]}
    async with running_provider(sqlite_url, None, **keys) as provider:
        for key in keys["PAYMENT_PROVIDER_API_KEYS"]:
            answer = await provider.client.get(
                "/webhook-messages", headers={"Authorization": f"Bearer {key}"}
            )
            assert answer.status_code == 200
        assert (await provider.client.get("/webhook-messages")).status_code == 401
