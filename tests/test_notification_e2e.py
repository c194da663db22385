"""The notification service with the sign-up services, as real processes (SQLite), each its own
broker user with the sender check on: the in-app stream, mail through ``email.send`` with
one-click unsubscribe, foreign events deduplicated, signed webhooks, quiet hours and digests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest

from tributary.contracts.envelope import new_event
from tributary.contracts.events import CommentMentionedV1, ReportReadyV1, WorkspaceCreatedV1
from tributary.testkit.infra import Found
from tributary.testkit.sse import SseReader
from tributary.testkit.waiting import wait_until

from .conftest import new_stack
from .stack import ALL_SERVICES, Stack, get_json


@pytest.fixture(scope="module")
def five(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found
) -> Iterator[Stack]:
    """The five services on SQLite, shared by the module (each test uses its own users)."""
    workdir = tmp_path_factory.mktemp("notification-stack")
    with new_stack(request, "sqlite", workdir, rabbitmq.url, services=ALL_SERVICES) as stack:
        stack.start(ALL_SERVICES)
        yield stack


def sign_up(stack: Stack) -> tuple[str, str]:
    email = f"nia.{uuid.uuid4().hex[:10]}@example.com"
    body = {"email": email, "name": "Nia Okafor", "plan": "free", "locale": "en-GB"}
    with stack.client("identity") as client:
        answer = client.post("/users", json=body)
    answer.raise_for_status()
    return answer.json()["id"], email


def notifications(stack: Stack, user_id: str, **params: Any) -> list[dict[str, Any]]:
    page = get_json(stack, "notification", f"/users/{user_id}/notifications", limit=100, **params)
    items: list[dict[str, Any]] = page["items"]
    return items


def notification_mails(stack: Stack, address: str) -> list[Message]:
    """Mails the notification service asked for (the welcome mail is the email service's)."""
    return [m for m in stack.mail.to(address) if m.get("List-Unsubscribe")]


@asynccontextmanager
async def stream(stack: Stack, user_id: str, **headers: str) -> AsyncIterator[SseReader]:
    url = f"{stack.url('notification')}/users/{user_id}/notifications/stream"
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as client,
        client.stream("GET", url, headers={**stack.admin_headers(), **headers}) as response,
    ):
        assert response.status_code == 200, await response.aread()
        yield SseReader(response)


def workspace_created(user_id: str) -> Any:
    workspace_id = f"ws_{uuid.uuid4().hex[:20]}"
    return new_event(
        routing_key="workspace.created.v1",
        source="/services/onboarding",
        subject=f"workspaces/{workspace_id}",
        idempotencykey=f"workspace.created:{workspace_id}",
        data=WorkspaceCreatedV1(
            workspace_id=workspace_id,
            owner_id=user_id,
            name="Second workspace",
            created_at=datetime.now(UTC),
        ),
    )


def report_ready(user_id: str) -> Any:
    report_id = f"rpt_{uuid.uuid4().hex[:16]}"
    return new_event(
        routing_key="report.ready.v1",
        source="/apps/reports",
        subject=f"reports/{report_id}",
        idempotencykey=f"report.ready:{report_id}",
        data=ReportReadyV1(
            report_id=report_id,
            user_id=user_id,
            report_name="Quarterly numbers",
            url="https://reports.example.com/r/1",
            ready_at=datetime.now(UTC),
        ),
    )


def mention(user_id: str, comment: str | None = None) -> Any:
    comment_id = comment or f"cmt_{uuid.uuid4().hex[:16]}"
    return new_event(
        routing_key="comment.mentioned.v1",
        source="/apps/comments",
        subject=f"comments/{comment_id}",
        idempotencykey=f"comment.mentioned:{comment_id}",
        data=CommentMentionedV1(
            comment_id=comment_id,
            document_id="doc_0123456789",
            author_user_id="usr_author0123456789",
            mentioned_user_id=user_id,
            excerpt="@nia have a look",
            url="https://comments.example.com/c/1",
            mentioned_at=datetime.now(UTC),
        ),
    )


def test_a_sign_up_reaches_the_stream_and_one_mail_whose_one_click_link_works(
    five: Stack,
) -> None:
    stack = five
    user_id, address = sign_up(stack)

    async def first_event() -> dict[str, Any]:
        async with stream(stack, user_id) as events:
            message = await events.next_event(timeout=30)
            assert message.event == "notification"
            found: dict[str, Any] = message.json()
            return found

    shown = asyncio.run(first_event())
    assert (shown["category"], shown["title"]) == ("account", "Your workspace is ready")

    mails = wait_until(lambda: notification_mails(stack, address), what="the workspace mail")
    assert len(mails) == 1
    mail = mails[0]
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = str(mail["List-Unsubscribe"]).strip("<>")
    assert link.startswith(stack.url("notification") + "/unsubscribe?token=")

    # a mail scanner's GET changes nothing; the RFC 8058 POST switches the category's email off
    with httpx.Client(timeout=10) as client:
        assert client.get(link).status_code == 200
        answer = client.post(link, data={"List-Unsubscribe": "One-Click"})
    assert answer.status_code < 300, answer.text
    prefs = get_json(stack, "notification", f"/users/{user_id}/preferences")
    assert prefs["categories"]["account"]["email"] is False

    # the next event of that category: in-app, no mail; a report (email on) is the barrier
    stack.publish("workspace.created.v1", workspace_created(user_id).to_bytes())
    stack.publish("report.ready.v1", report_ready(user_id).to_bytes())
    wait_until(lambda: len(notifications(stack, user_id)) == 3, what="three in-app notifications")
    wait_until(lambda: len(notification_mails(stack, address)) == 2, what="the report mail")
    subjects = [str(m["Subject"]) for m in notification_mails(stack, address)]
    assert sum("workspace" in s.lower() for s in subjects) == 1, subjects


def test_a_foreign_mention_delivered_five_times_is_one_notification(five: Stack) -> None:
    stack = five
    user_id, _ = sign_up(stack)
    event = mention(user_id)
    stack.publish("comment.mentioned.v1", event.to_bytes(), times=5)
    again = mention(user_id, comment=event.data.comment_id)  # re-announced under a new id
    stack.publish("comment.mentioned.v1", again.to_bytes())
    barrier = report_ready(user_id)
    stack.publish("report.ready.v1", barrier.to_bytes())
    wait_until(
        lambda: {n["category"] for n in notifications(stack, user_id)} >= {"mentions", "reports"},
        what="the mention and the barrier",
    )
    mentions = [n for n in notifications(stack, user_id) if n["category"] == "mentions"]
    assert len(mentions) == 1


def test_the_stream_resumes_after_the_last_event_id(five: Stack, tmp_path: Path) -> None:
    stack = five
    user_id, _ = sign_up(stack)
    wait_until(lambda: notifications(stack, user_id), what="the workspace notification")
    first = notifications(stack, user_id)[0]["id"]
    stack.publish("report.ready.v1", report_ready(user_id).to_bytes())

    async def after_first() -> dict[str, Any]:
        async with stream(stack, user_id, **{"Last-Event-ID": str(first)}) as events:
            message = await events.next_event(timeout=30)
            found: dict[str, Any] = message.json()
            return found

    shown = asyncio.run(after_first())
    assert shown["category"] == "reports"
    assert shown["id"] > first
