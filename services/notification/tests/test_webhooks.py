"""Webhooks end to end: the app on the real broker (SQLite and PostgreSQL) delivering to a real
receiver on 127.0.0.1 that verifies every request with ``standardwebhooks``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import UniqueConstraint, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel, col, select

from tributary.contracts.envelope import CloudEvent, new_event
from tributary.contracts.events import NotificationJobV1
from tributary.messaging.db import OutboxRow
from tributary.messaging.headers import REPLAY
from tributary.messaging.testing import publish_raw
from tributary.notification.webhook_models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .events import comment_mentioned, new_user, report_ready, user_created, user_erased
from .receiver import Answer, Receiver, make_ca, receiver
from .service import NotificationService, notification_service, routing_key

FAST = {
    "NOTIFICATION_WEBHOOK_ALLOW_LOOPBACK": True,
    "NOTIFICATION_WEBHOOK_RETRY_SCHEDULE": [0, 0.5, 1],
    "NOTIFICATION_WEBHOOK_TIMEOUT_SECONDS": 5,
}


@pytest.fixture
async def hook() -> AsyncIterator[Receiver]:
    async with receiver() as running:
        yield running


@pytest.fixture
async def service(database_url: str, rabbitmq: Found) -> AsyncIterator[NotificationService]:
    async with notification_service(database_url, rabbitmq.url, **FAST) as running:
        yield running


@pytest.fixture
async def on_sqlite(sqlite_url: str, rabbitmq: Found) -> AsyncIterator[NotificationService]:
    async with notification_service(sqlite_url, rabbitmq.url, **FAST) as running:
        yield running


async def register(
    service: NotificationService, user: str, url: str, **fields: Any
) -> dict[str, Any]:
    answer = await service.client.post(
        f"/users/{user}/webhooks", json={"url": url, **fields}, headers=service.tokens.member(user)
    )
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def new_subscriber(service: NotificationService, hook: Receiver, **fields: Any) -> str:
    """A user known to the service, with ``hook`` registered (its secret given to it)."""
    user = new_user()
    await service.deliver(user_created(user))
    endpoint = await register(service, user, hook.url, **fields)
    assert endpoint["secret"].startswith("whsec_")
    hook.secrets = [endpoint["secret"]]
    return str(endpoint["id"])


async def deliveries(service: NotificationService, endpoint_id: str) -> list[WebhookDelivery]:
    async with service.app.state.sessions() as session:
        rows = await session.exec(
            select(WebhookDelivery)
            .where(col(WebhookDelivery.endpoint_id) == endpoint_id)
            .order_by(col(WebhookDelivery.seq))
        )
        return list(rows.all())


async def settled(service: NotificationService, endpoint_id: str, count: int = 1) -> None:
    """Until ``count`` deliveries of the endpoint have no attempt to come."""

    async def done() -> bool:
        found = await deliveries(service, endpoint_id)
        return len(found) >= count and all(d.status != "pending" for d in found)

    await eventually(done, timeout=20, what="the deliveries to settle")


async def jobs_staged(service: NotificationService) -> list[str]:
    """Event ids of the webhook jobs the service staged (published or not)."""
    async with service.app.state.sessions() as session:
        rows = await session.exec(
            select(OutboxRow.event_id).where(col(OutboxRow.routing_key) == "notification.job.v1")
        )
        return list(rows.all())


async def log_of(service: NotificationService, user: str, endpoint_id: str) -> list[Any]:
    answer = await service.client.get(f"/users/{user}/webhooks/{endpoint_id}/deliveries")
    assert answer.status_code == 200, answer.text
    items: list[Any] = answer.json()["items"]
    return items


async def test_one_signed_delivery_per_notification_however_often_it_is_announced(
    service: NotificationService, hook: Receiver
) -> None:
    endpoint = await new_subscriber(service, hook)
    user = await _owner(service, endpoint)
    report = report_ready(user, "Q3 revenue")
    again = report.model_copy(update={"id": f"{report.id}-again"})  # re-announced, new event id
    await service.publish(report, times=3)
    await service.publish(again)
    await service.handled(report, times=3)
    await service.handled(again)

    [first] = await hook.wait_for(1)
    assert first.verified_with == hook.secrets
    assert first.headers["content-type"] == "application/json"
    body = json.loads(first.body)
    assert body["type"] == "notification.created"
    assert body["data"]["category"] == "reports"
    assert body["data"]["title"] == "Your report is ready"
    assert body["data"]["body"] == "Your report “Q3 revenue” is ready to download."
    assert body["data"]["url"] == "https://reports.example.com/r/1"
    assert body["data"]["inbox_id"] == 1
    assert body["data"]["id"].startswith("ntf_")
    assert b"@" not in first.body  # no address of anyone
    [delivery] = await deliveries(service, endpoint)
    assert first.id == delivery.id
    # every job there is has been handled: no second request can come
    [job] = await jobs_staged(service)
    await service.recorder.wait(lambda: service.recorder.of(job), what="the attempt's job")
    await settled(service, endpoint)
    assert len(hook.received) == 1

    following = report_ready(user, "Q4 revenue")
    await service.deliver(following)
    second = (await hook.wait_for(2))[1]
    assert second.id != first.id
    assert json.loads(second.body)["data"]["inbox_id"] == 2


async def _owner(service: NotificationService, endpoint_id: str) -> str:
    async with service.app.state.sessions() as session:
        row = await session.get(WebhookEndpoint, endpoint_id)
        assert row is not None
        return str(row.user_id)


async def test_failures_are_retried_on_the_schedule_with_the_same_webhook_id(
    service: NotificationService, hook: Receiver
) -> None:
    endpoint = await new_subscriber(service, hook)
    user = await _owner(service, endpoint)
    hook.answer(500, 307)  # a redirect is not followed: a failure like any other
    await service.deliver(report_ready(user))

    attempts = await hook.wait_for(3)
    await settled(service, endpoint)
    assert [a.answered for a in attempts] == [500, 307, 200]
    assert {a.id for a in attempts} == {attempts[0].id}
    assert all(a.verified_with == hook.secrets for a in attempts)
    # not before their time (0.5 s, then 1 s after the failure before, counted from when
    # that attempt began: less the time its request took to arrive)
    assert attempts[1].at - attempts[0].at >= 0.4
    assert attempts[2].at - attempts[1].at >= 0.9
    assert len({a.headers["webhook-timestamp"] for a in attempts}) >= 2  # each signed anew

    [logged] = await log_of(service, user, endpoint)
    assert logged["id"] == attempts[0].id
    assert logged["status"] == "succeeded"
    assert logged["next_attempt_at"] is None
    assert [
        (a["number"], a["trigger"], a["status_code"], a["succeeded"]) for a in logged["attempts"]
    ] == [
        (1, "scheduled", 500, False),
        (2, "scheduled", 307, False),
        (3, "scheduled", 200, True),
    ]
    assert all(a["duration_ms"] is not None and a["error"] is None for a in logged["attempts"])
    shown = (await service.client.get(f"/users/{user}/webhooks/{endpoint}")).json()
    assert shown["failing_since"] is None
    assert shown["last_success_at"] is not None
    assert "secret" not in shown
    metrics = (await service.client.get("/metrics")).text
    assert (
        'tributary_webhook_attempts_total{outcome="http_status",service="notification"} 2.0'
        in metrics
    )
    assert (
        'tributary_webhook_attempts_total{outcome="succeeded",service="notification"} 1.0'
        in metrics
    )


async def test_410_gone_disables_the_endpoint_at_once_and_tells_the_user(
    service: NotificationService, hook: Receiver
) -> None:
    endpoint = await new_subscriber(service, hook)
    user = await _owner(service, endpoint)
    hook.answer(410)
    await service.deliver(report_ready(user))
    await hook.wait_for(1)
    await settled(service, endpoint)

    shown = (await service.client.get(f"/users/{user}/webhooks/{endpoint}")).json()
    assert (shown["enabled"], shown["disabled_reason"]) == (False, "gone")
    [logged] = await log_of(service, user, endpoint)
    assert logged["status"] == "failed"
    assert [a["status_code"] for a in logged["attempts"]] == [410]
    inbox = (await service.client.get(f"/users/{user}/notifications")).json()["items"]
    assert [n["category"] for n in inbox] == ["account", "reports"]
    assert inbox[0]["title"] == "A webhook endpoint was disabled"
    assert "410 Gone" in inbox[0]["body"]
    assert "127.0.0.1" in inbox[0]["body"]
    metrics = (await service.client.get("/metrics")).text
    assert (
        'tributary_webhook_endpoints_disabled_total{reason="gone",service="notification"} 1.0'
        in metrics
    )

    # disabled: the next notification makes no delivery (and no re-send is taken)
    ignored = report_ready(user, "ignored")
    await service.deliver(ignored)
    assert len(await deliveries(service, endpoint)) == 1
    refused = await service.client.post(
        f"/users/{user}/webhooks/{endpoint}/deliveries/{logged['id']}/resend"
    )
    assert refused.status_code == 409, refused.text

    # enabled again: deliveries resume
    enabled = await service.client.patch(
        f"/users/{user}/webhooks/{endpoint}", json={"enabled": True}
    )
    assert enabled.json()["enabled"] is True
    assert enabled.json()["disabled_reason"] is None
    await service.deliver(report_ready(user, "after"))
    received = await hook.wait_for(2)
    assert "after" in json.loads(received[1].body)["data"]["body"]
    assert len(hook.received) == 2


async def test_an_endpoint_failing_past_the_disable_period_is_disabled_and_the_user_told(
    database_url: str, rabbitmq: Found, hook: Receiver
) -> None:
    settings = {
        **FAST,
        "NOTIFICATION_WEBHOOK_RETRY_SCHEDULE": [0, 0.5, 0.5, 0.5, 0.5],
        "NOTIFICATION_WEBHOOK_DISABLE_AFTER_SECONDS": 0.8,
    }
    async with notification_service(database_url, rabbitmq.url, **settings) as service:
        endpoint = await new_subscriber(service, hook)
        user = await _owner(service, endpoint)
        hook.answer(*[500] * 10)
        await service.deliver(report_ready(user))
        await settled(service, endpoint)

        # attempts at 0 and 0.5 s fail inside the period; the one at 1 s is past it (on a
        # loaded machine the second may already be past it: disabled after two, never later
        # than the first attempt past the period, and long before the schedule runs out)
        attempts = len(hook.received)
        assert 2 <= attempts <= 3, [a.answered for a in hook.received]
        assert [a.answered for a in hook.received] == [500] * attempts
        shown = (await service.client.get(f"/users/{user}/webhooks/{endpoint}")).json()
        assert (shown["enabled"], shown["disabled_reason"]) == (False, "failing")
        assert shown["failing_since"] is not None
        inbox = (await service.client.get(f"/users/{user}/notifications")).json()["items"]
        notices = [n for n in inbox if n["category"] == "account"]
        assert len(notices) == 1
        assert "have failed since" in notices[0]["body"]
        [delivery] = await deliveries(service, endpoint)
        assert (delivery.status, delivery.attempts, delivery.next_attempt) == (
            "failed",
            attempts,
            None,
        )

        # enabling restarts the failure clock: the next failure does not disable it again
        await service.client.patch(f"/users/{user}/webhooks/{endpoint}", json={"enabled": True})
        hook.script.clear()
        hook.answer(500)
        await service.deliver(report_ready(user, "second"))
        await hook.wait_for(5)  # a failure, then the retry succeeds
        await settled(service, endpoint, count=2)
        shown = (await service.client.get(f"/users/{user}/webhooks/{endpoint}")).json()
        assert shown["enabled"] is True
        assert shown["failing_since"] is None


async def test_a_rotated_secret_signs_alongside_the_new_one(
    on_sqlite: NotificationService, hook: Receiver
) -> None:
    service = on_sqlite
    endpoint = await new_subscriber(service, hook)
    user = await _owner(service, endpoint)
    [old] = hook.secrets
    rotated = await service.client.post(
        f"/users/{user}/webhooks/{endpoint}/rotate-secret", headers=service.tokens.member(user)
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new.startswith("whsec_")
    assert new != old
    assert rotated.json()["previous_secret_expires_at"] is not None
    hook.secrets = [old, new]

    await service.deliver(report_ready(user))
    [received] = await hook.wait_for(1)
    assert len(received.signatures) == 2
    assert received.verified_with == [old, new]  # either secret alone verifies it

    # a second rotation: the first secret signs no more, the second still does
    again = (await service.client.post(f"/users/{user}/webhooks/{endpoint}/rotate-secret")).json()
    hook.secrets = [old, new, again["secret"]]
    await service.deliver(report_ready(user, "later"))
    later = (await hook.wait_for(2))[1]
    assert later.verified_with == [new, again["secret"]]
    listed = (await service.client.get(f"/users/{user}/webhooks")).json()["items"]
    assert [e["id"] for e in listed] == [endpoint]
    assert all("secret" not in e for e in listed)


async def test_a_manual_resend_is_a_new_attempt_with_the_same_webhook_id(
    on_sqlite: NotificationService, hook: Receiver
) -> None:
    service = on_sqlite
    endpoint = await new_subscriber(service, hook)
    user = await _owner(service, endpoint)
    await service.deliver(report_ready(user))
    [first] = await hook.wait_for(1)
    await settled(service, endpoint)

    url = f"/users/{user}/webhooks/{endpoint}/deliveries/{first.id}/resend"
    resent = await service.client.post(url, headers=service.tokens.member(user))
    assert resent.status_code == 202, resent.text
    assert resent.json()["attempt"] == 1
    second = (await hook.wait_for(2))[1]
    assert second.id == first.id
    assert second.body == first.body
    assert second.verified_with == hook.secrets

    async def logged_twice() -> bool:
        [logged] = await log_of(service, user, endpoint)
        return len(logged["attempts"]) == 2

    await eventually(logged_twice, what="the re-send in the log")
    [logged] = await log_of(service, user, endpoint)
    assert [(a["trigger"], a["number"]) for a in logged["attempts"]] == [
        ("scheduled", 1),
        ("manual", 1),
    ]
    missing = await service.client.post(
        f"/users/{user}/webhooks/{endpoint}/deliveries/msg_000000000000/resend"
    )
    assert missing.status_code == 404


async def test_the_delivery_log_pages_newest_first(
    on_sqlite: NotificationService, hook: Receiver
) -> None:
    service = on_sqlite
    endpoint = await new_subscriber(service, hook)
    user = await _owner(service, endpoint)
    await service.deliver(*(report_ready(user, f"r{n}") for n in range(3)))
    await settled(service, endpoint, count=3)
    base = f"/users/{user}/webhooks/{endpoint}/deliveries"
    first = (await service.client.get(base, params={"limit": 2})).json()
    assert [json.loads(json.dumps(i["payload"]))["data"]["inbox_id"] for i in first["items"]] == [
        3,
        2,
    ]
    rest = (await service.client.get(base, params={"cursor": first["next_cursor"]})).json()
    assert [i["payload"]["data"]["inbox_id"] for i in rest["items"]] == [1]
    assert rest["next_cursor"] is None
    failed = (await service.client.get(base, params={"status": "failed"})).json()
    assert failed["items"] == []
    bad = await service.client.get(base, params={"cursor": "nonsense"})
    assert bad.status_code == 422


async def test_categories_and_preferences_choose_what_an_endpoint_gets(
    on_sqlite: NotificationService, hook: Receiver
) -> None:
    service = on_sqlite
    endpoint = await new_subscriber(service, hook, categories=["mentions"])
    user = await _owner(service, endpoint)
    await service.deliver(report_ready(user))  # not a mention: not for this endpoint
    assert await deliveries(service, endpoint) == []
    await service.deliver(comment_mentioned(user))
    [received] = await hook.wait_for(1)
    assert json.loads(received.body)["data"]["category"] == "mentions"

    put = await service.client.put(
        f"/users/{user}/preferences", json={"categories": {"mentions": {"webhook": False}}}
    )
    assert put.status_code == 200
    await service.deliver(comment_mentioned(user))
    assert len(await deliveries(service, endpoint)) == 1


async def test_a_replay_calls_no_endpoint(on_sqlite: NotificationService, hook: Receiver) -> None:
    service = on_sqlite
    endpoint = await new_subscriber(service, hook)
    user = await _owner(service, endpoint)
    replayed = report_ready(user)
    await publish_replayed(service, replayed)
    await service.handled(replayed)
    inbox = (await service.client.get(f"/users/{user}/notifications")).json()["items"]
    assert len(inbox) == 1  # in-app is made again on a replay; webhooks are irreversible
    assert await deliveries(service, endpoint) == []

    # a replayed attempt job does not call the endpoint either
    hook.answer(500)
    await service.deliver(report_ready(user, "to retry"))
    [delivery] = await _pending_after_failure(service, endpoint)
    job = new_event(
        routing_key="notification.job.v1",
        source="/services/notification",
        data=NotificationJobV1(job="webhook_attempt", ref=f"{delivery.id}:2", user_id=user),
    )
    await publish_replayed(service, job)
    await service.handled(job)
    async with service.app.state.sessions() as session:
        made = await session.exec(
            select(WebhookAttempt).where(col(WebhookAttempt.delivery_id) == delivery.id)
        )
        assert len(made.all()) == 1
    assert len(hook.received) == 1


async def publish_replayed(service: NotificationService, event: CloudEvent[Any]) -> None:
    """As ``eventctl replay`` (not forced) delivers it."""
    await publish_raw(
        service.broker_url,
        service.names,
        routing_key(event),
        event.to_bytes(),
        headers={REPLAY: "1"},
    )


async def _pending_after_failure(
    service: NotificationService, endpoint: str
) -> list[WebhookDelivery]:
    async def failed_once() -> bool:
        found = await deliveries(service, endpoint)
        return bool(found) and found[0].attempts == 1

    await eventually(failed_once, what="the first attempt")
    return await deliveries(service, endpoint)


async def test_a_restart_between_attempts_loses_nothing(
    database_url: str, rabbitmq: Found, hook: Receiver
) -> None:
    settings = {**FAST, "NOTIFICATION_WEBHOOK_RETRY_SCHEDULE": [0, 3]}
    async with notification_service(database_url, rabbitmq.url, **settings) as service:
        endpoint = await new_subscriber(service, hook)
        user = await _owner(service, endpoint)
        hook.answer(503)
        await service.deliver(report_ready(user))
        [delivery] = await _pending_after_failure(service, endpoint)
        assert delivery.next_attempt == 2
    # stopped with the second attempt scheduled; another process takes over
    async with notification_service(database_url, rabbitmq.url, **settings) as service:
        attempts = await hook.wait_for(2)
        await settled(service, endpoint)
        assert [a.answered for a in attempts] == [503, 200]
        assert attempts[1].id == attempts[0].id
        assert attempts[1].at - attempts[0].at >= 2.9
        [delivery] = await deliveries(service, endpoint)
        assert (delivery.status, delivery.attempts) == ("succeeded", 2)


async def test_erasure_deletes_the_users_endpoints_and_deliveries(
    on_sqlite: NotificationService, hook: Receiver
) -> None:
    service = on_sqlite
    endpoint = await new_subscriber(service, hook)
    user = await _owner(service, endpoint)
    await service.deliver(report_ready(user))
    await settled(service, endpoint)
    await service.deliver(user_erased(user))
    async with service.app.state.sessions() as session:
        for table in (WebhookEndpoint, WebhookDelivery, WebhookAttempt):
            left = await session.exec(select(table).where(col(table.user_id) == user))
            assert left.all() == [], table
    listed = await service.client.get(f"/users/{user}/webhooks")
    assert listed.json()["items"] == []
    again = await service.client.post(f"/users/{user}/webhooks", json={"url": hook.url})
    assert again.status_code == 404


async def test_https_goes_to_the_checked_address_with_the_name_for_tls(
    sqlite_url: str, rabbitmq: Found, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path)
    settings = {**FAST, "NOTIFICATION_WEBHOOK_CA_FILE": str(ca.ca_file)}
    async with (
        receiver(tls=ca) as secure,
        notification_service(sqlite_url, rabbitmq.url, **settings) as service,
    ):
        port = secure.url.split(":")[2].split("/")[0]
        # by name: resolved to 127.0.0.1, connected there, the certificate checked for localhost
        secure.url = f"https://localhost:{port}/hook"
        endpoint = await new_subscriber(service, secure)
        user = await _owner(service, endpoint)
        await service.deliver(report_ready(user))
        [received] = await secure.wait_for(1)
        assert received.headers["host"] == f"localhost:{port}"
        assert received.verified_with == secure.secrets
        # by address: the certificate does not name 127.0.0.1, so nothing is sent
        by_address = await register(service, user, f"https://127.0.0.1:{port}/hook")
        await service.client.delete(f"/users/{user}/webhooks/{endpoint}")
        await service.deliver(report_ready(user, "by address"))
        await settled(service, by_address["id"])
        [logged] = await log_of(service, user, by_address["id"])
        assert len(logged["attempts"]) == 3  # every scheduled attempt refused by TLS
        for attempt in logged["attempts"]:
            assert attempt["error"] == "connect_error"
            assert "CERTIFICATE_VERIFY_FAILED" in attempt["detail"]
        assert len(secure.received) == 1


async def test_a_slow_endpoint_times_out(sqlite_url: str, rabbitmq: Found, hook: Receiver) -> None:
    settings = {
        **FAST,
        "NOTIFICATION_WEBHOOK_TIMEOUT_SECONDS": 0.5,
        "NOTIFICATION_WEBHOOK_RETRY_SCHEDULE": [0],
    }
    async with notification_service(sqlite_url, rabbitmq.url, **settings) as service:
        endpoint = await new_subscriber(service, hook)
        user = await _owner(service, endpoint)
        hook.answer(Answer(200, delay=2))
        await service.deliver(report_ready(user))
        await settled(service, endpoint)
        [logged] = await log_of(service, user, endpoint)
        assert logged["status"] == "failed"
        [attempt] = logged["attempts"]
        assert (attempt["error"], attempt["status_code"]) == ("timeout", None)
        assert 400 <= attempt["duration_ms"] < 2000


def refusal(answer: Any) -> tuple[str, str, str]:
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["errors"]
    return error["field"], error["type"], error["message"]


async def test_private_loopback_and_link_local_urls_are_refused_at_registration(
    sqlite_url: str, rabbitmq: Found
) -> None:
    settings = {"NOTIFICATION_WEBHOOK_ALLOWED_NETWORKS": ["10.20.0.0/16"]}
    async with notification_service(sqlite_url, rabbitmq.url, **settings) as service:
        user = new_user()
        url = f"/users/{user}/webhooks"
        member = service.tokens.member(user)
        refused = {
            "https://10.0.0.1/hook": ("forbidden_address", "a private address"),
            "https://192.168.1.20/hook": ("forbidden_address", "a private address"),
            "https://169.254.169.254/latest/meta-data": ("forbidden_address", "link-local"),
            "https://127.0.0.1/hook": ("forbidden_address", "a loopback address"),
            "https://[::1]:8443/hook": ("forbidden_address", "a loopback address"),
            "https://[::ffff:10.0.0.1]/hook": ("forbidden_address", "a private address"),
            "https://0.0.0.0/hook": ("forbidden_address", "unspecified"),
            "https://224.0.0.1/hook": ("forbidden_address", "multicast"),
            "https://localhost/hook": ("forbidden_address", "localhost resolves to"),
            "http://127.0.0.1:9/hook": ("forbidden_address", "loopback"),
            "http://10.20.1.2/hook": ("scheme", "https"),
            "ftp://files.example.com/hook": ("scheme", "https"),
            "https://user:pass@hooks.example.com/": ("invalid_url", "credentials"),
            "https://hooks.example.com/#part": ("invalid_url", "fragment"),
            "https://no-such-host.invalid/hook": ("unresolvable", "does not resolve"),
        }
        for target, (reason, says) in refused.items():
            answer = await service.client.post(url, json={"url": target}, headers=member)
            field, kind, message = refusal(answer)
            assert (field, kind) == ("body.url", reason), target
            assert says in message, (target, message)
        allowed = await service.client.post(url, json={"url": "https://10.20.1.2/hook"})
        assert allowed.status_code == 201, allowed.text
        endpoint = allowed.json()["id"]
        moved = await service.client.patch(
            f"{url}/{endpoint}", json={"url": "https://169.254.169.254/"}
        )
        assert refusal(moved)[1] == "forbidden_address"
        listed = (await service.client.get(url)).json()["items"]
        assert [e["url"] for e in listed] == ["https://10.20.1.2/hook"]


async def test_a_name_resolving_to_a_forbidden_address_at_delivery_is_never_called(
    sqlite_url: str, rabbitmq: Found, hook: Receiver
) -> None:
    port = hook.url.split(":")[2].split("/")[0]
    async with notification_service(sqlite_url, rabbitmq.url, **FAST) as service:
        hook.url = f"http://localhost:{port}/hook"  # allowed while loopback is
        endpoint = await new_subscriber(service, hook)
        user = await _owner(service, endpoint)
    # the operator no longer allows loopback: localhost now points somewhere forbidden
    settings = {**FAST, "NOTIFICATION_WEBHOOK_ALLOW_LOOPBACK": False}
    async with notification_service(sqlite_url, rabbitmq.url, **settings) as service:
        await service.deliver(report_ready(user))
        await settled(service, endpoint)
        [logged] = await log_of(service, user, endpoint)
        assert logged["status"] == "failed"
        assert len(logged["attempts"]) == 3  # each attempt checks again
        for attempt in logged["attempts"]:
            assert (attempt["error"], attempt["duration_ms"]) == ("forbidden_address", None)
            assert "a loopback address" in attempt["detail"]
        assert hook.received == []
        metrics = (await service.client.get("/metrics")).text
        assert 'outcome="forbidden_address",service="notification"} 3.0' in metrics


def _shape(conn: Connection) -> dict[str, Any]:
    found = inspect(conn)
    return {
        table.name: (
            {(c["name"], c["nullable"]) for c in found.get_columns(table.name)},
            {
                (i["name"], tuple(i["column_names"]))
                for i in found.get_indexes(table.name)
                if "duplicates_constraint" not in i
            },
            {
                (u["name"], tuple(u["column_names"]))
                for u in found.get_unique_constraints(table.name)
            },
        )
        for table in TABLES
    }


TABLES = [
    SQLModel.metadata.tables[n]
    for n in ("webhook_endpoints", "webhook_deliveries", "webhook_attempts")
]


async def test_the_migration_makes_the_tables_the_models_declare(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        made = await conn.run_sync(_shape)
    declared = {
        table.name: (
            {(c.name, c.nullable) for c in table.columns},
            {(i.name, tuple(c.name for c in i.columns)) for i in table.indexes},
            {
                (c.name, tuple(col.name for col in c.columns))
                for c in table.constraints
                if isinstance(c, UniqueConstraint)
            },
        )
        for table in TABLES
    }
    assert made == declared
