"""One-click unsubscribe through the running app (real broker, SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlmodel import col, func, select

from tributary.messaging.db import OutboxRow
from tributary.notification import tokens
from tributary.testkit.infra import Found

from .events import (
    comment_mentioned,
    new_user,
    report_ready,
    user_created,
    user_erased,
    workspace_created,
)
from .service import KEY, NotificationService, notification_service

BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
ONE_CLICK = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def service(database_url: str, rabbitmq: Found) -> AsyncIterator[NotificationService]:
    # a mention's mail is a digest: a short window sends it soon
    async with notification_service(
        database_url, rabbitmq.url, NOTIFICATION_DIGEST_WINDOW_SECONDS=0.5
    ) as running:
        yield running


def mint(user: str, category: Any = "mentions", ttl: float = 600) -> str:
    return tokens.mint(user, category, key=KEY.encode(), ttl_seconds=ttl)


async def email_commands(service: NotificationService) -> int:
    async with service.app.state.sessions() as session:
        query = select(func.count()).where(col(OutboxRow.routing_key) == "email.send.v1")
        return int((await session.exec(query)).one())


async def cell(service: NotificationService, user: str, category: str) -> tuple[bool, str]:
    shown = (await service.client.get(f"/users/{user}/preferences")).json()
    return shown["categories"][category]["email"], shown["sources"][category]["email"]


async def test_the_link_in_a_mail_turns_that_categorys_email_off_in_one_click(
    service: NotificationService,
) -> None:
    user = new_user()
    await service.deliver(user_created(user), comment_mentioned(user))
    [command] = await service.commands(expect=1)
    link = command["list_unsubscribe_url"]
    path = link.removeprefix("https://notify.example.com")

    answer = await service.client.post(
        path, content="List-Unsubscribe=One-Click", headers={**ONE_CLICK, "Authorization": ""}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"user_id": user, "category": "mentions", "email": False}
    assert answer.headers["cache-control"] == "no-store"
    assert await cell(service, user, "mentions") == (False, "user")
    again = await service.client.post(path, headers={"Authorization": ""})  # a second click
    assert again.status_code == 200
    assert await cell(service, user, "reports") == (True, "default")  # only that category

    staged = await email_commands(service)
    await service.deliver(comment_mentioned(user), report_ready(user))
    assert await email_commands(service) == staged + 1  # the report's, not the mention's
    inbox = (await service.client.get(f"/users/{user}/notifications")).json()["items"]
    assert [n["category"] for n in inbox] == ["reports", "mentions", "mentions"]  # in-app stays

    page = await service.client.post(path, headers={**BROWSER, "Authorization": ""})
    assert page.headers["content-type"].startswith("text/html")
    assert "no longer get emails about mention notifications" in page.text


async def test_account_mail_can_be_unsubscribed_from_but_its_in_app_stays(
    service: NotificationService,
) -> None:
    user = new_user()
    await service.deliver(user_created(user), workspace_created(user))
    [command] = await service.commands(expect=1)
    path = command["list_unsubscribe_url"].removeprefix("https://notify.example.com")
    answer = await service.client.post(path, headers={"Authorization": ""})
    assert answer.json() == {"user_id": user, "category": "account", "email": False}
    staged = await email_commands(service)
    await service.deliver(workspace_created(user, "Another"))
    assert await email_commands(service) == staged
    inbox = (await service.client.get(f"/users/{user}/notifications")).json()["items"]
    assert [n["category"] for n in inbox] == ["account", "account"]  # critical in-app


async def test_opening_the_link_only_asks_and_changes_nothing(
    service: NotificationService,
) -> None:
    user = new_user()
    token = mint(user, "reports")
    for _ in range(2):  # a person, then a mail scanner following every link
        page = await service.client.get(
            "/unsubscribe", params={"token": token}, headers={**BROWSER, "Authorization": ""}
        )
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert "Stop report emails?" in page.text
        form = re.search(r'<form method="post" action="([^"]+)">', page.text)
        assert form is not None
        assert form.group(1) == f"?token={token}"
        assert 'name="List-Unsubscribe" value="One-Click"' in page.text
    assert await cell(service, user, "reports") == (True, "default")


async def test_forged_foreign_expired_and_critical_tokens_are_refused_each_with_its_reason(
    service: NotificationService,
) -> None:
    user, other = new_user(), new_user()
    good = mint(user)
    version, payload, mac = good.split(".")
    raw = base64.urlsafe_b64decode(payload + "==").decode()

    def signed_as_good(text: str) -> str:
        return f"{version}.{base64.urlsafe_b64encode(text.encode()).rstrip(b'=').decode()}.{mac}"

    cases = {
        "forged": (tokens.mint(user, "mentions", key=b"not the key", ttl_seconds=600), 403),
        "another user": (signed_as_good(raw.replace(user, other)), 403),
        "another category": (signed_as_good(raw.replace("mentions", "reports")), 403),
        "expired": (mint(user, ttl=-5), 410),
        "malformed": ("u1.not-a-token", 400),
    }
    for name, (token, status) in cases.items():
        posted = await service.client.post(
            "/unsubscribe", params={"token": token}, headers={"Authorization": ""}
        )
        assert posted.status_code == status, (name, posted.text)
        assert posted.headers["content-type"].startswith("application/problem+json"), name
        assert posted.json()["status"] == status
        assert user not in posted.text
        shown = await service.client.get("/unsubscribe", params={"token": token})
        assert (shown.status_code, shown.headers["content-type"]) == (
            status,
            "application/problem+json",
        ), name
        browser = await service.client.get("/unsubscribe", params={"token": token}, headers=BROWSER)
        assert browser.status_code == status
        assert "This link does not work" in browser.text
        assert "<form" not in browser.text
    for who in (user, other):
        shown = (await service.client.get(f"/users/{who}/preferences")).json()
        assert set(shown["sources"]["mentions"].values()) == {"default"}
    missing = await service.client.post("/unsubscribe", headers={"Authorization": ""})
    assert missing.status_code == 422


async def test_an_erased_users_link_stores_nothing(service: NotificationService) -> None:
    user = new_user()
    await service.deliver(user_created(user), user_erased(user))
    token = mint(user)
    assert (await service.client.post("/unsubscribe", params={"token": token})).status_code == 404
    assert (await service.client.get("/unsubscribe", params={"token": token})).status_code == 404
