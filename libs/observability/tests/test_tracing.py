"""One request → outbox → broker → handler → outbox → broker → handler is one trace."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tributary.contracts.envelope import Event
from tributary.contracts.events import UserCreatedV2, WorkspaceCreatedV1
from tributary.messaging.testing import OutcomeRecorder, delete_prefixed, isolated_settings
from tributary.messaging.uow import UnitOfWork
from tributary.observability.logs import JsonFormatter
from tributary.observability.tracing import TRACE_SQL
from tributary.service.app import ServiceSpec, UowDep, create_app
from tributary.service.settings import ServiceSettings
from tributary.testkit.infra import Found

EMAIL = "ada.lovelace@example.com"
HANDLED: list[tuple[str, trace.SpanContext, bool, str | None]] = []
"""What each handler saw: event type, its current span's context, recording, correlation id."""


def _seen(event_type: str) -> None:
    from tributary.messaging import context

    span = trace.get_current_span()
    HANDLED.append(
        (event_type, span.get_span_context(), span.is_recording(), context.current().correlation_id)
    )


class Settings(ServiceSettings):
    port: int = 0


async def on_user_created(event: Event[UserCreatedV2], uow: UnitOfWork) -> None:
    _seen(event.type)
    logging.getLogger("obs.test").info("making a workspace for %s", event.data.email)
    uow.outbox.add(
        WorkspaceCreatedV1(
            workspace_id="ws_" + event.data.user_id[4:],
            owner_id=event.data.user_id,
            name="Ada's workspace",
            created_at=datetime.now(UTC),
        )
    )


async def on_workspace_created(event: Event[WorkspaceCreatedV1], uow: UnitOfWork) -> None:
    _seen(event.type)


def build(tmp_path: Path, broker: str) -> FastAPI:
    router = APIRouter()

    @router.post("/signup", status_code=201)
    async def signup(uow: UowDep) -> dict[str, str]:
        event = uow.outbox.add(
            UserCreatedV2(
                user_id="usr_trace000001",
                email=EMAIL,
                given_name="Ada",
                family_name="Lovelace",
                plan="free",
                locale="en-GB",
                created_at=datetime.now(UTC),
            )
        )
        await uow.commit()
        return {"event_id": event.id}

    return create_app(
        ServiceSpec(
            name="obs",
            settings=Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'obs.db'}"),
            migrations=None,
            routers=[router],
            handlers={UserCreatedV2: on_user_created, WorkspaceCreatedV1: on_workspace_created},
            messaging=isolated_settings(broker),
        )
    )


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider: Any = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.fail("setup_tracing did not install an SDK tracer provider")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
async def app(tmp_path: Path, rabbitmq: Found) -> AsyncIterator[FastAPI]:
    app = build(tmp_path, rabbitmq.url)
    yield app
    bus = app.state.bus
    qs = bus.names.service_queues("obs", len(bus.settings.retry_tiers))
    await delete_prefixed(rabbitmq.url, bus.names, [qs.work, qs.dlq, *qs.retries])


def _one(spans: list[ReadableSpan], kind: SpanKind, name: str) -> ReadableSpan:
    found = [s for s in spans if s.kind == kind and s.name == name]
    assert len(found) == 1, f"{kind} {name}: {[s.name for s in spans]}"
    return found[0]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_request_and_every_event_it_causes_form_one_trace(
    app: FastAPI,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    from tributary.service.testing import running

    monkeypatch.setenv(TRACE_SQL, "true")  # statement spans are opt-in
    request.addfinalizer(SQLAlchemyInstrumentor().uninstrument)  # the process's other tests

    recorder = OutcomeRecorder()
    async with running(app) as client:
        app.state.bus.listeners.append(recorder)
        response = await client.post("/signup", headers={"X-Correlation-ID": "corr-trace-1"})
        assert response.status_code == 201
        assert response.headers["x-correlation-id"] == "corr-trace-1"
        await recorder.wait(
            lambda: any(
                r.outcome == "processed" and (r.event_type or "").endswith("workspace.created.v1")
                for r in recorder.records
            )
        )
    spans = list(exporter.get_finished_spans())
    server = next(s for s in spans if s.kind == SpanKind.SERVER and "/signup" in s.name)
    publish_user = _one(spans, SpanKind.PRODUCER, "publish user.created.v2")
    process_user = _one(spans, SpanKind.CONSUMER, "process user.created.v2")
    publish_ws = _one(spans, SpanKind.PRODUCER, "publish workspace.created.v1")
    process_ws = _one(spans, SpanKind.CONSUMER, "process workspace.created.v1")

    chain = [server, publish_user, process_user, publish_ws, process_ws]
    assert {s.context.trace_id for s in chain} == {server.context.trace_id}
    # the publish continues the request that wrote the outbox row (a child of one of its spans)
    request_spans = {
        s.context.span_id for s in spans if s.context.trace_id == server.context.trace_id
    }
    assert _parent(publish_user) in request_spans
    assert _parent(process_user) == publish_user.context.span_id
    assert _parent(publish_ws) == process_user.context.span_id
    assert _parent(process_ws) == publish_ws.context.span_id

    for span in chain[1:]:
        assert span.attributes is not None
        assert span.attributes["tributary.correlation_id"] == "corr-trace-1"
        assert span.attributes["messaging.system"] == "rabbitmq"
    assert process_user.attributes is not None
    assert process_user.attributes["cloudevents.event_type"] == "com.tributary.user.created.v2"

    # FastAPI's per-chunk ASGI send/receive spans are left out
    assert not [s.name for s in spans if s.name.endswith((" http send", " http receive"))]

    sql = [s for s in spans if s.attributes and "db.system" in s.attributes]
    assert sql, "the SQLAlchemy instrumentation recorded no span"
    assert any(s.context.trace_id == server.context.trace_id for s in sql)

    for span in spans:
        flat = json.dumps(dict(span.attributes or {}), default=str)
        assert EMAIL not in flat, f"PII in span {span.name}"


async def _sign_up(app: FastAPI, headers: dict[str, str]) -> dict[str, dict[str, str]]:
    """Sign up, wait for the last handler; the outbox rows' trace context by routing key."""
    from tributary.service.testing import running

    recorder = OutcomeRecorder()
    async with running(app) as client:
        app.state.bus.listeners.append(recorder)
        response = await client.post("/signup", headers=headers)
        assert response.status_code == 201
        await recorder.wait(
            lambda: any(
                r.outcome == "processed" and (r.event_type or "").endswith("workspace.created.v1")
                for r in recorder.records
            )
        )
        return await _trace_headers(app)


async def _trace_headers(app: FastAPI) -> dict[str, dict[str, str]]:
    from sqlmodel import select
    from sqlmodel.ext.asyncio.session import AsyncSession

    from tributary.messaging.db import OutboxRow

    async with AsyncSession(app.state.engine) as session:
        rows = (await session.exec(select(OutboxRow))).all()
    return {row.routing_key: json.loads(row.trace_headers) for row in rows}


async def test_an_unsampled_request_records_nothing_but_its_trace_id_still_travels(
    tmp_path: Path, rabbitmq: Found, exporter: InMemorySpanExporter
) -> None:
    """A parent-based sampler downstream needs the trace id and the sampled=0 flag."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    HANDLED.clear()
    app = build(tmp_path, rabbitmq.url)
    try:
        stored = await _sign_up(
            app,
            {
                "X-Correlation-ID": "corr-unsampled",
                "traceparent": f"00-{trace_id}-00f067aa0ba902b7-00",
            },
        )
    finally:
        bus = app.state.bus
        qs = bus.names.service_queues("obs", len(bus.settings.retry_tiers))
        await delete_prefixed(rabbitmq.url, bus.names, [qs.work, qs.dlq, *qs.retries])

    assert not [
        s.name for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id
    ], "spans were recorded for a trace that is not sampled"
    # the outbox rows of the request and of the handler carry the trace, flag 00
    for routing_key in ("user.created.v2", "workspace.created.v1"):
        version, tid, _span, flags = stored[routing_key]["traceparent"].split("-")
        assert (version, tid, flags) == ("00", trace_id, "00"), routing_key
    # each consumer continued it: same trace, not sampled, nothing recording, same correlation
    assert sorted(t for t, *_ in HANDLED) == [
        "com.tributary.user.created.v2",
        "com.tributary.workspace.created.v1",
    ]
    for _, span_context, recording, correlation_id in HANDLED:
        assert f"{span_context.trace_id:032x}" == trace_id
        assert not span_context.trace_flags.sampled
        assert not recording
        assert correlation_id == "corr-unsampled"


async def test_sql_statements_get_no_spans_unless_asked_for(
    tmp_path: Path, rabbitmq: Found, exporter: InMemorySpanExporter
) -> None:
    app = build(tmp_path, rabbitmq.url)
    try:
        await _sign_up(app, {"X-Correlation-ID": "corr-no-sql"})
    finally:
        bus = app.state.bus
        qs = bus.names.service_queues("obs", len(bus.settings.retry_tiers))
        await delete_prefixed(rabbitmq.url, bus.names, [qs.work, qs.dlq, *qs.retries])
    spans = exporter.get_finished_spans()
    assert any(s.kind == SpanKind.CONSUMER for s in spans)
    statements = {"db.statement", "db.query.text"}
    assert not [s.name for s in spans if statements & set(s.attributes or {})]


def test_the_sql_setting_is_a_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    from tributary.observability.tracing import sql_spans_enabled

    for value, expected in (("", False), ("false", False), ("0", False), ("TRUE", True)):
        monkeypatch.setenv(TRACE_SQL, value)
        assert sql_spans_enabled() is expected
    monkeypatch.setenv(TRACE_SQL, "sometimes")
    with pytest.raises(ValueError, match=TRACE_SQL):
        sql_spans_enabled()


def test_json_logs_carry_the_context_and_mask_addresses() -> None:
    from tributary.messaging import context

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", (EMAIL,), None)
    record.__dict__["outcome"] = "processed"
    record.__dict__["email"] = EMAIL  # not a known field: dropped
    ctx = context.MessageContext(
        correlation_id="c-1", event_id="e-1", event_type="com.tributary.user.created.v2"
    )
    with context.use(ctx):
        line = json.loads(JsonFormatter("obs").format(record))
    assert line["message"] == "hello a***@example.com"
    assert line["correlation_id"] == "c-1"
    assert line["event_id"] == "e-1"
    assert line["outcome"] == "processed"
    assert line["service"] == "obs"
    assert EMAIL not in json.dumps(line)
