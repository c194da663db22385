"""The API on the running app (real broker, SQLite and PostgreSQL): inbox, preferences, authz."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlmodel import col, select

from tributary.messaging.db import OutboxRow
from tributary.testkit.infra import Found

from .events import comment_mentioned, new_user, report_ready, user_created, user_erased
from .service import NotificationService, notification_service


@pytest.fixture
async def service(database_url: str, rabbitmq: Found) -> AsyncIterator[NotificationService]:
    # a mention's mail is a digest: a short window sends it soon
    async with notification_service(
        database_url, rabbitmq.url, NOTIFICATION_DIGEST_WINDOW_SECONDS=0.5
    ) as running:
        yield running


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


async def test_the_inbox_pages_filters_unread_and_marks_read(service: NotificationService) -> None:
    user = new_user()
    await service.deliver(user_created(user), *(report_ready(user, f"r{n}") for n in range(5)))
    member = service.tokens.member(user)
    base = f"/users/{user}/notifications"

    first = (await service.client.get(base, params={"limit": 2}, headers=member)).json()
    assert [n["id"] for n in first["items"]] == [5, 4]
    assert first["items"][0]["body"] == "Your report “r4” is ready to download."
    second = (
        await service.client.get(base, params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert [n["id"] for n in second["items"]] == [3, 2]
    last = await service.client.get(base, params={"limit": 2, "cursor": second["next_cursor"]})
    assert [n["id"] for n in last.json()["items"]] == [1]
    assert last.json()["next_cursor"] is None

    read = await service.client.post(f"{base}/4/read", headers=member)
    assert read.status_code == 200
    assert read.json()["read_at"] is not None
    again = await service.client.post(f"{base}/4/read", headers=member)
    assert again.json()["read_at"] == read.json()["read_at"]  # the first time is kept
    unread = (await service.client.get(base, params={"unread": "true"}, headers=member)).json()
    assert [n["id"] for n in unread["items"]] == [5, 3, 2, 1]
    page = (await service.client.get(base, params={"unread": "true", "limit": 3})).json()
    more = await service.client.get(base, params={"unread": "true", "cursor": page["next_cursor"]})
    assert [n["id"] for n in more.json()["items"]] == [1]

    marked = await service.client.post(f"{base}/read-all", params={"up_to": 3}, headers=member)
    assert marked.json() == {"marked": 3}
    unread = (await service.client.get(base, params={"unread": "true"})).json()
    assert [n["id"] for n in unread["items"]] == [5]
    assert (await service.client.post(f"{base}/read-all")).json() == {"marked": 1}
    assert (await service.client.get(base, params={"unread": "true"})).json()["items"] == []

    missing = problem(await service.client.post(f"{base}/99/read"), 404)
    assert missing["errors"][0]["field"] == "path.notification_id"
    for bad in ("nonsense", "bjE6MA", "bjE6LTE", first["next_cursor"] + "x"):
        body = problem(await service.client.get(base, params={"cursor": bad}), 422)
        assert body["errors"][0]["field"] == "query.cursor"
    assert problem(await service.client.get(base, params={"limit": 101}), 422)


async def test_preferences_show_defaults_and_precedence_and_put_replaces_the_choices(
    service: NotificationService,
) -> None:
    user = new_user()
    url = f"/users/{user}/preferences"
    member = service.tokens.member(user)

    shown = (await service.client.get(url, headers=member)).json()
    assert shown["critical"] == {"account": ["in_app"]}
    assert shown["quiet_hours"] is None
    assert shown["categories"] == {  # the defaults: all on but billing email
        category: {"in_app": True, "email": category != "billing", "webhook": True}
        for category in ("account", "billing", "mentions", "reports")
    }
    assert shown["sources"]["account"] == {
        "in_app": "critical",
        "email": "default",
        "webhook": "default",
    }
    assert shown["sources"]["mentions"]["email"] == "default"

    body = {
        "categories": {
            "mentions": {"email": False},
            "account": {"in_app": True, "email": False},
            "billing": {"email": True},
        }
    }
    put = await service.client.put(url, json=body, headers=member)
    assert put.status_code == 200, put.text
    assert put.json()["categories"]["mentions"] == {"in_app": True, "email": False, "webhook": True}
    assert put.json()["sources"]["mentions"]["email"] == "user"
    assert put.json()["sources"]["account"]["in_app"] == "critical"
    assert put.json()["categories"]["account"] == {"in_app": True, "email": False, "webhook": True}
    assert put.json()["categories"]["billing"]["email"] is True
    assert (await service.client.get(url)).json() == put.json()

    # the shown matrix can be sent back as it is (account in-app is on)
    same = await service.client.put(url, json={"categories": put.json()["categories"]})
    assert same.json()["categories"] == put.json()["categories"]
    assert same.json()["sources"]["reports"]["in_app"] == "user"
    reset = (await service.client.put(url, json={})).json()  # nothing chosen: the defaults
    assert reset["sources"]["mentions"] == dict.fromkeys(("in_app", "email", "webhook"), "default")

    critical = problem(
        await service.client.put(url, json={"categories": {"account": {"in_app": False}}}), 422
    )
    assert critical["errors"] == [
        {
            "field": "body.categories.account.in_app",
            "message": "account in_app notifications are critical and cannot be switched off",
            "type": "critical",
        }
    ]
    invalids: list[dict[str, Any]] = [
        {"categories": {"marketing": {"email": False}}},
        {"categories": {"mentions": {"sms": False}}},
        {"categories": {"mentions": {"email": "no"}}},
        {"categories": {"mentions": {"email": 0}}},
        {"categorys": {}},
        {"categories": {"mentions": True}},
    ]
    for invalid in invalids:
        answer = await service.client.put(url, json=invalid)
        assert problem(answer, 422)["errors"][0]["field"].startswith("body"), invalid
    assert (await service.client.get(url)).json() == reset


async def test_a_member_reaches_only_their_own_notifications_and_preferences(
    service: NotificationService,
) -> None:
    user, other = new_user(), new_user()
    await service.deliver(user_created(user), report_ready(user))
    member = service.tokens.member(other)
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/users/{user}/preferences", None),
        ("PUT", f"/users/{user}/preferences", {}),
        ("GET", f"/users/{user}/notifications", None),
        ("POST", f"/users/{user}/notifications/1/read", None),
        ("POST", f"/users/{user}/notifications/read-all", None),
        ("GET", f"/users/{user}/notifications/stream", None),
    ]
    for method, url, body in calls:
        answer = await service.client.request(method, url, json=body, headers=member)
        assert problem(answer, 403)["detail"].startswith("only the owner"), url
        nobody = {"Authorization": ""}
        anonymous = await service.client.request(method, url, json=body, headers=nobody)
        assert anonymous.status_code == 401, url
    own = await service.client.get(f"/users/{other}/notifications", headers=member)
    assert own.json() == {"items": [], "next_cursor": None}
    assert (await service.client.post(f"/users/{user}/notifications/1/read")).status_code == 200


async def test_a_foreign_mention_sent_five_times_is_one_notification_and_one_email_command(
    service: NotificationService,
) -> None:
    user = new_user()
    await service.deliver(user_created(user, "mentioned@example.com"))
    mention = comment_mentioned(user)
    await service.publish(mention, times=5)
    await service.handled(mention, times=5)
    assert [r.outcome for r in service.recorder.of(mention.id)].count("processed") == 1

    page = (await service.client.get(f"/users/{user}/notifications")).json()
    assert [n["category"] for n in page["items"]] == ["mentions"]
    [command] = await service.commands(expect=1)
    assert command["to"] == "mentioned@example.com"
    assert command["list_unsubscribe_url"].startswith("https://notify.example.com/unsubscribe?")
    async with service.app.state.sessions() as session:
        staged = (
            await session.exec(
                select(OutboxRow.published_at).where(col(OutboxRow.routing_key) == "email.send.v1")
            )
        ).all()
    assert len(staged) == 1
    assert staged[0] is not None  # published: the probe holds every command there is


async def test_an_erased_user_has_no_preferences_to_show_or_change(
    service: NotificationService,
) -> None:
    user = new_user()
    await service.deliver(user_created(user), report_ready(user), user_erased(user))
    url = f"/users/{user}/preferences"
    assert problem(await service.client.get(url), 404)["errors"][0]["field"] == "path.user_id"
    assert problem(await service.client.put(url, json={}), 404)
    assert (await service.client.get(f"/users/{user}/notifications")).json()["items"] == []
