"""The subscriptions API: ownership, the read model's pages and filters, cancelling with and
without If-Match (a stale version: 409, nothing appended), a paid one cannot be cancelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .harness import billing_stack, new_user


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


async def test_subscriptions_belong_to_their_user_and_cancel_honours_if_match(
    database_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    async with billing_stack(database_url, rabbitmq.url, tmp_path) as stack:
        ada, bob = new_user(), new_user()
        as_ada, as_bob = stack.tokens.member(ada), stack.tokens.member(bob)
        made = [await stack.subscribe(ada, plan) for plan in ("starter", "pro", "starter")]
        url = f"/subscriptions/{made[0]['id']}"

        shown = await stack.client.get(url, headers=as_ada)
        assert shown.headers["etag"] == '"2"'
        problem(await stack.client.get(url, headers=as_bob), 404)  # as if absent
        problem(await stack.client.post(f"{url}/cancel", headers=as_bob), 404)
        problem(
            await stack.client.post(
                "/subscriptions", json={"plan": "pro", "user_id": ada}, headers=as_bob
            ),
            403,
        )
        problem(
            await stack.client.get("/subscriptions", params={"user_id": ada}, headers=as_bob), 403
        )
        problem(await stack.client.get("/revenue", headers=as_ada), 403)
        problem(await stack.client.get("/subscriptions/sub_absent0000"), 404)
        problem(await stack.client.post("/subscriptions", json={"plan": "gold"}), 422)

        # cancelling the version seen: a stale one is refused and nothing is appended
        stale = await stack.client.post(f"{url}/cancel", headers={**as_ada, "If-Match": '"1"'})
        assert "version" in problem(stale, 409)["detail"]
        assert len(await stack.stream(made[0]["id"])) == 2
        problem(await stack.client.post(f"{url}/cancel", headers={**as_ada, "If-Match": "x"}), 422)
        cancelled = await stack.client.post(f"{url}/cancel", headers={**as_ada, "If-Match": '"2"'})
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.headers["etag"] == '"3"'
        again = await stack.client.post(f"{url}/cancel", headers=as_ada)
        assert again.json()["version"] == 3  # no change
        checkout = await stack.provider.client.get(f"/checkouts/{made[0]['checkout_id']}")
        assert checkout.json()["status"] == "expired"  # it can no longer be paid
        problem(await stack.provider.pay(made[0]["checkout_id"], "succeed"), 409)
        assert len(await stack.outbox("subscription.cancelled.v1")) == 1

        # paid, or being paid: no cancelling
        await stack.provider.pay(made[1]["checkout_id"], "delay", delay_seconds=60)
        problem(
            await stack.client.post(f"/subscriptions/{made[1]['id']}/cancel", headers=as_ada), 409
        )
        await stack.provider.pay(made[2]["checkout_id"], "succeed")

        async def paid() -> bool:
            shown = await stack.client.get(f"/subscriptions/{made[2]['id']}")
            return bool(shown.json()["status"] == "paid")

        await eventually(paid, what="the payment's webhook")
        refused = await stack.client.post(f"/subscriptions/{made[2]['id']}/cancel", headers=as_ada)
        assert "paid" in problem(refused, 409)["detail"]

        # the read model: newest first, a page at a time, by status
        first = (
            await stack.client.get("/subscriptions", params={"limit": 2}, headers=as_ada)
        ).json()
        assert [i["id"] for i in first["items"]] == [made[2]["id"], made[1]["id"]]
        rest = await stack.client.get(
            "/subscriptions", params={"limit": 2, "cursor": first["next_cursor"]}, headers=as_ada
        )
        assert [i["id"] for i in rest.json()["items"]] == [made[0]["id"]]
        assert rest.json()["next_cursor"] is None
        by_status = await stack.client.get(
            "/subscriptions", params={"status": "cancelled"}, headers=as_ada
        )
        assert [i["id"] for i in by_status.json()["items"]] == [made[0]["id"]]
        assert (await stack.client.get("/subscriptions", headers=as_bob)).json()["items"] == []
        for bad in ("nonsense", "eHx5", first["next_cursor"] + "x"):
            body = problem(await stack.client.get("/subscriptions", params={"cursor": bad}), 422)
            assert body["errors"][0]["field"] == "query.cursor"
