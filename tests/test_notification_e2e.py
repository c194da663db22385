"""The notification service with the sign-up services, as real processes (SQLite), each its own
broker user with the sender check on: the in-app stream, mail through ``email.send`` with
one-click unsubscribe, foreign events deduplicated, signed webhooks, quiet hours and digests.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tributary.contracts.envelope import new_event
from tributary.contracts.events import CommentMentionedV1, ReportReadyV1, WorkspaceCreatedV1
from tributary.testkit.infra import Found
from tributary.testkit.sse import SseReader
from tributary.testkit.waiting import wait_until

from .conftest import new_stack
from .stack import ALL_SERVICES, Stack, get_json

# slow: long and mostly waiting (faults, time windows, processes starting): `make test` runs it
# in its second pytest process, beside the rest of the suite
pytestmark = pytest.mark.slow


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
            url=f"https://reports.example.com/r/{report_id}",
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
            url=f"https://comments.example.com/c/{comment_id}",
            mentioned_at=datetime.now(UTC),
        ),
    )


def test_a_sign_up_reaches_the_stream_and_one_mail_whose_one_click_link_works(
    five: Stack,
) -> None:
    stack = five
    user_id, address = sign_up(stack)

    async def first_event() -> dict[str, Any]:
        # from the user's first notification: it may be made before the stream is open
        async with stream(stack, user_id, **{"Last-Event-ID": "0"}) as events:
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


class Receiver:
    """A webhook endpoint on 127.0.0.1 that verifies every request with ``standardwebhooks``
    and answers the scripted statuses in turn (then 200)."""

    def __init__(self, *statuses: int) -> None:
        self.script = list(statuses)
        self.secret = ""
        self.received: list[tuple[dict[str, str], bytes, bool, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(receiver.secret).verify(body, headers)
                    verified = True
                except WebhookVerificationError:
                    verified = False
                status = receiver.script.pop(0) if receiver.script else 200
                receiver.received.append((headers, body, verified, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_webhook_is_signed_retried_after_a_500_and_delivered_once(five: Stack) -> None:
    stack = five
    user_id, _ = sign_up(stack)
    with Receiver(500) as hook:
        with stack.client("notification") as client:
            answer = client.post(
                f"/users/{user_id}/webhooks", json={"url": hook.url, "categories": ["reports"]}
            )
        assert answer.status_code == 201, answer.text
        hook.secret = answer.json()["secret"]
        event = report_ready(user_id)
        stack.publish("report.ready.v1", event.to_bytes(), times=3)  # redelivered: one delivery
        wait_until(lambda: [r for r in hook.received if r[3] == 200], what="the retried delivery")
        barrier = report_ready(user_id)
        stack.publish("report.ready.v1", barrier.to_bytes())
        wait_until(lambda: len({r[0]["webhook-id"] for r in hook.received}) == 2, what="barrier")

    assert all(verified for _, _, verified, _ in hook.received)
    first = [r for r in hook.received if event.data.url.encode() in r[1]]
    assert [status for *_, status in first] == [500, 200]  # retried once, then delivered
    assert len({headers["webhook-id"] for headers, *_ in first}) == 1  # the same message


def _utc_clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%S")


def test_quiet_hours_hold_mail_until_they_end_across_a_restart(five: Stack) -> None:
    stack = five
    user_id, address = sign_up(stack)
    wait_until(lambda: notification_mails(stack, address), what="the workspace mail")
    start = datetime.now(UTC) - timedelta(minutes=1)
    end = (datetime.now(UTC) + timedelta(seconds=12)).replace(microsecond=0)
    quiet = {"start": _utc_clock(start), "end": _utc_clock(end), "time_zone": "UTC"}
    with stack.client("notification") as client:
        answer = client.put(f"/users/{user_id}/preferences", json={"quiet_hours": quiet})
    assert answer.status_code == 200, answer.text

    stack.publish("report.ready.v1", report_ready(user_id).to_bytes())
    wait_until(  # in-app at once: it is silent
        lambda: any(n["category"] == "reports" for n in notifications(stack, user_id)),
        what="the in-app notification",
    )
    stack.services["notification"].stop()  # the held mail and its job survive a restart
    stack.restart("notification")
    assert datetime.now(UTC) < end, "the restart outlasted the quiet hours: widen the window"
    assert len(notification_mails(stack, address)) == 1  # only the workspace mail so far
    wait_until(
        lambda: len(notification_mails(stack, address)) == 2, timeout=60, what="the held mail"
    )
    assert datetime.now(UTC) >= end
    assert len(notification_mails(stack, address)) == 2


def test_twenty_mentions_with_a_kill_in_the_window_make_one_digest_listing_all(
    five: Stack,
) -> None:
    stack = five
    user_id, address = sign_up(stack)
    wait_until(lambda: notification_mails(stack, address), what="the workspace mail")
    mentions = [mention(user_id) for _ in range(20)]
    window_ends = time.monotonic() + 30  # NOTIFICATION_DIGEST_WINDOW_SECONDS of the stack
    for event in mentions[:10]:
        stack.publish("comment.mentioned.v1", event.to_bytes())
    wait_until(
        lambda: len(notifications(stack, user_id, unread="true")) >= 11,
        what="the first ten mentions in-app",
    )
    stack.services["notification"].kill()  # SIGKILL in the middle of the digest window
    for event in mentions[10:]:
        stack.publish("comment.mentioned.v1", event.to_bytes(), times=2)  # and redelivered
    stack.restart("notification")
    assert time.monotonic() < window_ends, "the restart outlasted the digest window: widen it"

    def digests() -> list[Message]:
        return [m for m in notification_mails(stack, address) if "mentioned" in str(m["Subject"])]

    wait_until(digests, timeout=60, what="the digest mail")
    mentioned = [n for n in notifications(stack, user_id) if n["category"] == "mentions"]
    assert len(mentioned) == 20
    (digest,) = digests()
    assert str(digest["Subject"]) == "You were mentioned in 20 comments"
    text = digest.get_payload(decode=True).decode()
    for event in mentions:
        assert event.data.url in text
