"""The timeline page's server side: the page and its files, the login's key exchange with
identity, and ``GET /audit/timeline`` built from recorded events (the browser test in
tests/test_audit_ui.py drives the page itself against real processes)."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tributary.audit.handlers import trace_id
from tributary.audit.models import AuditEntry
from tributary.audit.ui import Session, build_timeline, exchange
from tributary.contracts.envelope import new_event
from tributary.contracts.events import MessageDeadLetteredV1
from tributary.service.problems import Problem
from tributary.testkit.infra import Found

from .test_api import Audit, audit_service, new_user_id
from .test_handlers import user_created, workspace_created

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
KEY = "trib_" + "k" * 43


def dead_lettered(
    service: str, message_id: str, correlation_id: str, at: datetime, routing_key: str
) -> Any:
    return new_event(
        routing_key="message.dead_lettered.v1",
        source=f"/services/{service}",
        correlationid=correlation_id,
        causationid=message_id,
        time=at,
        data=MessageDeadLetteredV1(
            service=service,
            consumer=service,
            queue=f"{service}.events",
            dlq=f"{service}.dlq",
            message_type=routing_key,
            message_id=message_id,
            correlation_id=correlation_id,
            reason="schema_invalid",
            attempts=0,
            error=f"{routing_key}: data.***: violates pattern '***' (pattern)",
            dead_lettered_at=at,
        ),
    )


@pytest.fixture(scope="module")
async def audit(tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found) -> AsyncIterator[Audit]:
    path = tmp_path_factory.mktemp("audit-ui") / "audit.db"
    async with audit_service(
        f"sqlite+aiosqlite:///{path}",
        rabbitmq,
        AUDIT_JAEGER_URL="https://jaeger.example.test/",
        AUDIT_IDENTITY_URL="http://127.0.0.1:9",  # nothing listens: sign-in is unavailable
    ) as service:
        yield service


# -- the page ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/audit/ui", "text/html"),
        ("/audit/ui/app.js", "text/javascript"),
        ("/audit/ui/app.css", "text/css"),
    ],
)
async def test_the_page_and_its_files_are_served_with_a_strict_policy(
    audit: Audit, path: str, media_type: str
) -> None:
    answer = await httpx.AsyncClient(
        transport=httpx.ASGITransport(audit.app), base_url="http://t"
    ).get(path)  # no token: the page holds no data
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith(media_type)
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_the_page_loads_nothing_from_elsewhere_and_labels_every_input() -> None:
    static = Path(__file__).parents[1] / "src" / "tributary" / "audit" / "static"
    html = (static / "index.html").read_text()
    assert "http://" not in html
    assert "https://" not in html
    assert "<script>" not in html
    assert " style=" not in html
    ids = re.findall(r'<input id="([^"]+)"', html)
    assert len(ids) == 6
    for input_id in ids:
        assert f'<label for="{input_id}">' in html, input_id


# -- login ------------------------------------------------------------------------------------


def identity(answers: list[httpx.Response], seen: list[dict[str, str]]) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(dict(httpx.QueryParams(request.content.decode())))
        return answers[min(len(seen), len(answers)) - 1]

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def token_answer(scope: str) -> httpx.Response:
    body = {"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 300, "scope": scope}
    return httpx.Response(200, json=body)


async def test_the_login_asks_for_the_audit_scopes_only_and_falls_back_to_reading() -> None:
    seen: list[dict[str, str]] = []
    async with identity([token_answer("audit:read audit:verify")], seen) as client:
        session = await exchange(client, "http://identity", KEY)
    assert session == Session(access_token="a.b.c", expires_in=300, scope="audit:read audit:verify")
    assert seen == [
        {
            "grant_type": "client_credentials",
            "client_secret": KEY,
            "scope": "audit:read audit:verify",
        }
    ]
    # an owner who may read but not verify: the second ask is for reading alone
    seen.clear()
    refused = httpx.Response(400, json={"error": "invalid_scope"})
    async with identity([refused, token_answer("audit:read")], seen) as client:
        session = await exchange(client, "http://identity", KEY)
    assert session.scope == "audit:read"
    assert [s["scope"] for s in seen] == ["audit:read audit:verify", "audit:read"]


@pytest.mark.parametrize(
    ("answers", "status"),
    [
        ([httpx.Response(401, json={"error": "invalid_client"})], 401),
        ([httpx.Response(400, json={"error": "invalid_scope"})] * 2, 403),
        ([httpx.Response(429, json={"title": "Too Many Requests"})], 429),
        ([httpx.Response(500, text="boom")], 503),
        ([httpx.Response(200, json={"access_token": "x"})], 503),
    ],
)
async def test_a_refused_login_says_why_without_the_key(
    answers: list[httpx.Response], status: int
) -> None:
    async with identity(answers, []) as client:
        with pytest.raises(Problem) as refused:
            await exchange(client, "http://identity", KEY)
    assert refused.value.status_code == status
    assert KEY not in str(refused.value.detail)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.integers(100, 599),
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=8,
    )
    | st.fixed_dictionaries(
        {"access_token": st.text(max_size=10), "expires_in": st.integers() | st.text(max_size=5)}
    )
    | st.fixed_dictionaries({"error": st.sampled_from(["invalid_scope", "invalid_client", "x"])}),
)
async def test_whatever_identity_answers_the_login_ends_in_a_session_or_a_problem(
    status: int, body: Any
) -> None:
    async with identity([httpx.Response(status, json=body)], []) as client:
        try:
            outcome: Session | Problem = await exchange(client, "http://identity", KEY)
        except Problem as problem:
            outcome = problem
    if isinstance(outcome, Problem):
        assert outcome.status_code in {401, 403, 429, 503}
        assert KEY not in str(outcome.detail)
    else:
        assert status == 200
        assert isinstance(outcome.expires_in, int)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=st.dictionaries(st.sampled_from(["api_key", "x"]), st.text(max_size=250))
    | st.dictionaries(st.just("api_key"), st.integers() | st.none() | st.lists(st.text()))
)
async def test_any_login_body_is_refused_cleanly_and_never_echoed(
    audit: Audit, body: dict[str, Any]
) -> None:
    """Validated before identity is asked (unreachable here: 503 for a well-formed key)."""
    answer = await audit.client.post("/audit/ui/login", json=body)
    assert answer.status_code in {422, 503}, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    value = body.get("api_key")
    if isinstance(value, str) and len(value) >= 4:
        assert value not in answer.text


# -- the timeline -----------------------------------------------------------------------------


def test_trace_ids_come_from_a_w3c_traceparent_only() -> None:
    assert trace_id(f"00-{TRACE}-00f067aa0ba902b7-01") == TRACE
    for other in (None, "", "garbage", f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{TRACE}"):
        assert trace_id(other) is None


async def test_a_requests_timeline_shows_producers_replies_dead_letters_and_traces(
    audit: Audit,
) -> None:
    cid, user_id = uuid.uuid4().hex, new_user_id()
    created = user_created(user_id, correlation_id=cid, time=T0).model_copy(
        update={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}
    )
    workspace = workspace_created(
        user_id, correlation_id=cid, causation_id=created.id, time=T0 + timedelta(seconds=0.25)
    )
    poisoned_id = str(uuid.uuid4())
    letters = [
        dead_lettered(s, poisoned_id, cid, T0 + timedelta(seconds=1 + n / 10), "user.created.v2")
        for n, s in enumerate(("onboarding", "email"))
    ]
    await audit.record(created, workspace, *letters)

    answer = await audit.client.get("/audit/timeline", params={"correlation_id": cid})
    assert answer.status_code == 200, answer.text
    timeline = answer.json()
    assert "ada@example.com" not in answer.text
    assert "Lovelace" not in answer.text
    assert timeline["lanes"] == ["identity", "onboarding", "email", "notification", "audit"]
    first, second, poisoned = timeline["events"]
    assert (first["type"], first["producer"], first["offset_ms"]) == (
        "user.created.v2",
        "identity",
        0,
    )
    assert first["trace_id"] == TRACE
    assert first["trace_url"] == f"https://jaeger.example.test/trace/{TRACE}"
    hops = {h["service"]: h for h in first["consumers"]}
    assert hops["onboarding"]["status"] == "handled"
    assert hops["onboarding"]["after_ms"] == 250
    assert hops["onboarding"]["reply"] == "workspace.created.v1"
    assert hops["email"]["status"] == hops["notification"]["status"] == "unknown"
    assert hops["audit"]["status"] == "recorded"
    assert (second["type"], second["producer"], second["offset_ms"]) == (
        "workspace.created.v1",
        "onboarding",
        250,
    )
    assert second["trace_url"] is None
    # the poisoned event is not in the log: its row comes from the dead letters about it
    assert (poisoned["event_id"], poisoned["recorded"]) == (poisoned_id, False)
    assert poisoned["offset_ms"] == 1000
    red = {h["service"]: h for h in poisoned["consumers"] if h["status"] == "dead_lettered"}
    assert set(red) == {"onboarding", "email"}
    assert red["email"]["reason"] == "schema_invalid"
    assert red["email"]["attempts"] == 0
    assert [d["service"] for d in timeline["dead_letters"]] == ["onboarding", "email"]
    assert [d["offset_ms"] for d in timeline["dead_letters"]] == [1000, 1100]
    assert timeline["truncated"] is False
    # the entries keep the trace id, outside the hash: the chain still verifies
    [entry] = await audit.entries(correlation_id=cid, type="user.created")
    assert entry["trace_id"] == TRACE
    assert (await audit.verify())["ok"] is True


async def test_an_unknown_request_has_an_empty_timeline(audit: Audit) -> None:
    answer = await audit.client.get("/audit/timeline", params={"correlation_id": "nothing-here"})
    assert answer.json()["events"] == []
    missing = await audit.client.get("/audit/timeline")
    assert missing.status_code == 422


async def test_the_login_answers_503_when_identity_cannot_be_reached(audit: Audit) -> None:
    answer = await audit.client.post("/audit/ui/login", json={"api_key": KEY})
    assert answer.status_code == 503
    assert KEY not in answer.text


def test_malformed_dead_letter_entries_are_left_out_of_the_timeline() -> None:
    entry = AuditEntry(
        seq=1,
        event_id="e1",
        type="com.tributary.message.dead_lettered.v1",
        data_type="message.dead_lettered.v1",
        source="/services/email",
        correlation_id="c",
        event_time=T0,
        recorded_at=T0,
        data={"service": "email"},
    )
    timeline = build_timeline("c", [entry], jaeger_url="http://j")
    assert timeline.events == []
    assert timeline.dead_letters == []
