"""One sign-up is one trace across identity, onboarding, email and audit (real OTLP export)."""

from __future__ import annotations

import json
import uuid

from tributary.testkit.otlp import OtlpReceiver, ReceivedSpan
from tributary.testkit.waiting import wait_until

from .stack import Stack, get_json
from .test_signup_e2e import audit, sign_up, unique_email, workspaces

CORRELATION = "corr.trace-e2e"


def _find(spans: list[ReceivedSpan], service: str, kind: str, name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service and s.kind == kind and s.name == name]


def test_one_sign_up_is_one_trace_with_the_correlation_id_and_no_pii(stack: Stack) -> None:
    with OtlpReceiver() as receiver:
        stack.otlp = receiver
        stack.extra_env["TRIBUTARY_TRACE_SQL"] = "true"  # statement spans are opt-in
        stack.start()
        email = unique_email()
        cid = f"{CORRELATION}-{uuid.uuid4().hex[:6]}"
        response = sign_up(stack, email, correlation_id=cid)
        assert response.status_code == 201
        user_id = response.json()["id"]
        wait_until(lambda: workspaces(stack, user_id), what="the workspace")
        wait_until(lambda: stack.mail.to(email), what="the welcome email")

        wanted = [
            ("identity", "PRODUCER", "publish user.created.v1"),
            ("onboarding", "CONSUMER", "process user.created.v1"),
            ("email", "CONSUMER", "process user.created.v1"),
            ("audit", "CONSUMER", "process user.created.v1"),
            ("onboarding", "PRODUCER", "publish workspace.created.v1"),
            ("audit", "CONSUMER", "process workspace.created.v1"),
        ]

        def complete(spans: list[ReceivedSpan]) -> bool:
            mine = [s for s in spans if s.attributes.get("tributary.correlation_id") == cid]
            return all(_find(mine, *w) for w in wanted)

        spans = receiver.wait_for(complete, timeout=60)

    server = [
        s
        for s in spans
        if s.service == "identity" and s.kind == "SERVER" and s.name.startswith("POST /users")
    ]
    assert len(server) == 1, [s.name for s in spans if s.service == "identity"]
    trace_id = server[0].trace_id
    in_trace = [s for s in spans if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in in_trace}

    def one(service: str, kind: str, name: str) -> ReceivedSpan:
        found = _find(in_trace, service, kind, name)
        assert len(found) == 1, f"{service} {kind} {name}: {len(found)} in the trace"
        return found[0]

    publish_user = one("identity", "PRODUCER", "publish user.created.v1")
    # the publish continues the request: its parent chain reaches the HTTP server span
    parent, hops = by_id.get(publish_user.parent_span_id), 0
    while parent is not None and parent.span_id != server[0].span_id and hops < 10:
        parent, hops = by_id.get(parent.parent_span_id), hops + 1
    assert parent is not None, "identity's publish is not a descendant of its HTTP span"

    for service in ("onboarding", "email", "audit"):
        process = one(service, "CONSUMER", "process user.created.v1")
        assert process.parent_span_id == publish_user.span_id, service
    publish_ws = one("onboarding", "PRODUCER", "publish workspace.created.v1")
    assert (
        publish_ws.parent_span_id
        == one("onboarding", "CONSUMER", "process user.created.v1").span_id
    )
    process_ws = one("audit", "CONSUMER", "process workspace.created.v1")
    assert process_ws.parent_span_id == publish_ws.span_id

    for span in [server[0], publish_user, publish_ws, process_ws]:
        assert span.attributes.get("tributary.correlation_id") == cid, span.name
    assert any("db.system" in s.attributes or "db.system.name" in s.attributes for s in in_trace)

    # the welcome email and the audit entries carry the same correlation id
    [record] = get_json(stack, "email", "/emails", to=email)
    assert record["correlation_id"] == cid
    types = {e["type"] for e in audit(stack, correlation_id=cid)}
    assert {"com.tributary.user.created.v1", "com.tributary.workspace.created.v1"} <= types

    # no PII: the address is in no span attribute and no log line
    assert all(email not in json.dumps(s.attributes, default=str) for s in spans)
    logs = stack.logs()
    assert cid in logs, "the services' logs do not carry the correlation id"
    assert email not in logs
    for line in logs.splitlines():
        if line.startswith("{"):
            json.loads(line)
