"""Runtime CPU per event and per request: each cost next to its raw baseline, in one run.

    uv run python -m bench.runtime_costs_bench [--quick] [--write FILE]

Prints a Markdown section (µs of CPU per operation, ``time.process_time``: every thread of
this process); ``--write FILE`` also puts it between markers in FILE. Asserts nothing. Each
figure is the best of several rounds (the least disturbed by the shared machine), contenders
interleaved round by round.

Figures:
  1  parsing and checking one structured-mode ``user.created.v2`` delivery as the consumer
     does (``parse_event`` + ``admit``), with the flat schema shortcut and with jsonschema;
     next to bare ``json.loads``, bare ``model_validate`` and each schema check alone
  2  ``Outbox.add`` of a ``user.created.v2`` with no trace, an unsampled and a sampled one,
     and with its strict check by jsonschema instead of the flat check; next to the
     ``propagate.inject`` and ``json.dumps`` of its trace context
  3  the consumer's span scope (trace context extracted from the headers, process span)
     for a sampled and an unsampled delivery; next to ``propagate.extract`` alone and to the
     span's attributes alone
  4  one SQL statement (SQLite, ``SELECT``) with and without the SQLAlchemy instrumentation,
     in an unsampled trace (``TRIBUTARY_TRACE_SQL`` decides whether services have it)
  5  a FastAPI request through the ASGI app (httpx ``ASGITransport``): a route with no
     dependency, with an async one and with a sync one (run in the thread pool)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from bench.common import package_version, run_stamp
from bench.report import bench_parser, print_section

MARKER = "runtime-costs"
EMAIL = "ada.lovelace@example.com"


@dataclass
class Row:
    figure: str
    what: str
    us: float
    baseline: str = ""

    def line(self, base: Row | None) -> str:
        ratio = f"{self.us / base.us:.2f}" if base and base.us else ""
        against = base.what if base else ""
        return f"| {self.figure} | {self.what} | {self.us:.1f} | {against} | {ratio} |"


def cpu_us(fn: Callable[[], Any], n: int) -> float:
    """µs of process CPU per call of ``fn`` over ``n`` calls."""
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


def best_of(contenders: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, float]:
    """Each contender's lowest µs per call over ``rounds`` interleaved rounds (rotating)."""
    for fn in contenders.values():
        fn()  # warm: caches, compiled validators, lazy imports
    names = list(contenders)
    best = {name: float("inf") for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            best[name] = min(best[name], cpu_us(contenders[name], n))
    return best


# -- 1: parsing and checking a delivery --------------------------------------------------------


def user_created() -> Any:
    from tributary.contracts.events import UserCreatedV2

    return UserCreatedV2(
        user_id="usr_0123456789",
        email=EMAIL,
        given_name="Ada",
        family_name="Lovelace",
        plan="free",
        locale="en-GB",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def figure_parse(n: int, rounds: int) -> list[Row]:
    from tributary.contracts.catalog import catalog
    from tributary.contracts.envelope import new_event, parse_event
    from tributary.contracts.events import UserCreatedV2
    from tributary.contracts.validation import flat_check, validate
    from tributary.messaging.consumer import admit

    body = new_event(
        routing_key="user.created.v2",
        source="identity",
        data=user_created(),
        correlationid="c-1",
    ).to_bytes()
    spec = catalog().by_routing_key("user.created.v2")
    data = json.loads(body)["data"]
    check = flat_check("user.created.v2")
    assert check is not None
    got = best_of(
        {
            "json": lambda: json.loads(body),
            "model": lambda: UserCreatedV2.model_validate(data),
            "parse": lambda: parse_event(body),
            "jsonschema": lambda: validate("user.created.v2", data, "tolerant"),
            "flat": lambda: check(data),
            "full": lambda: admit(spec, UserCreatedV2, parse_event(body).data, shortcut=False),
            "short": lambda: admit(spec, UserCreatedV2, parse_event(body).data),
        },
        n,
        rounds,
    )
    return [
        Row("1", "bare `json.loads` of the body", got["json"]),
        Row("1", "bare `UserCreatedV2.model_validate` of its data", got["model"]),
        Row("1", "`parse_event` (envelope, no data check)", got["parse"], "bare `json.loads`"),
        Row("1", "tolerant jsonschema check of the data (compiled once)", got["jsonschema"]),
        Row("1", "flat check of the data", got["flat"], "tolerant jsonschema"),
        Row("1", "parse + admit with jsonschema (before)", got["full"], "`parse_event`"),
        Row("1", "parse + admit with the flat check (now)", got["short"], "`parse_event`"),
    ]


# -- tracing set-up ----------------------------------------------------------------------------


def install_provider() -> None:
    """A parent-based SDK provider without exporter: what sampling costs, not export."""
    trace.set_tracer_provider(TracerProvider(sampler=ParentBased(ALWAYS_ON)))


@contextmanager
def traced(sampled: bool | None) -> Iterator[None]:
    """Run inside a span of an unsampled or a sampled trace; None: no span at all."""
    if sampled is None:
        yield
        return
    sampler = ALWAYS_ON if sampled else ALWAYS_OFF
    tracer = TracerProvider(sampler=sampler).get_tracer("bench")
    span = tracer.start_span("request")
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)
        span.end()


# -- 2: Outbox.add ------------------------------------------------------------------------------


class Session:
    """Stands in for the unit of work's session: ``add`` only keeps the last row."""

    def __init__(self) -> None:
        self.row: Any = None

    def add(self, row: Any) -> None:
        self.row = row


def figure_outbox(n: int, rounds: int) -> list[Row]:
    from tributary.messaging import uow
    from tributary.messaging.uow import Outbox

    outbox = Outbox(Session(), "identity")  # type: ignore[arg-type]
    payload = user_created()
    names = vars(uow)  # the module's globals: Outbox.add looks flat_check up there
    flat = names["flat_check"]

    def add_with_jsonschema() -> None:
        names["flat_check"] = lambda routing_key, mode="tolerant": None
        try:
            outbox.add(payload)
        finally:
            names["flat_check"] = flat

    got: dict[str, float] = {}
    for label, sampled in (("none", None), ("unsampled", False), ("sampled", True)):
        with traced(sampled):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            contenders: dict[str, Callable[[], Any]] = {
                "add": lambda: outbox.add(payload),
                "inject": lambda: propagate.inject({}),
                "dumps": lambda c=carrier: json.dumps(c),  # type: ignore[misc]
            }
            if sampled is None:
                contenders["before"] = add_with_jsonschema
            part = best_of(contenders, n, rounds)
        got |= {f"{k}-{label}": v for k, v in part.items()}
    return [
        Row("2", "`Outbox.add` with jsonschema (before), no trace", got["before-none"]),
        Row("2", "`Outbox.add`, no trace", got["add-none"], "`Outbox.add` with jsonschema"),
        Row("2", "`Outbox.add`, unsampled trace", got["add-unsampled"], "`Outbox.add`, no"),
        Row("2", "`Outbox.add`, sampled trace", got["add-sampled"], "`Outbox.add`, no"),
        Row("2", "of which `propagate.inject`, unsampled", got["inject-unsampled"]),
        Row("2", "of which `propagate.inject`, sampled", got["inject-sampled"]),
        Row("2", "of which `json.dumps` of the carrier", got["dumps-unsampled"]),
    ]


# -- 3: the consumer's span scope ---------------------------------------------------------------


def figure_consumer(n: int, rounds: int) -> list[Row]:
    from tributary.messaging import context
    from tributary.messaging.consumer import QueueConsumer

    queues = SimpleNamespace(work="identity.events", consumer="identity")
    consumer = SimpleNamespace(queues=queues)
    got: dict[str, float] = {}
    for label, flag in (("sampled", "01"), ("unsampled", "00")):
        headers = {
            "traceparent": f"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flag}",
            "x-tributary-producer": "identity",
            "x-tributary-attempts": 0,
            "correlationid": "c-1",
        }
        prepared = SimpleNamespace(
            message=SimpleNamespace(headers=headers),
            event=SimpleNamespace(
                routing_key="user.created.v2",
                id="e-1",
                correlationid="c-1",
                type="com.tributary.user.created.v2",
            ),
            ctx=context.MessageContext(correlation_id="c-1", event_id="e-1"),
        )

        def scope(p: Any = prepared) -> None:
            with QueueConsumer._scope(consumer, p):  # type: ignore[arg-type]
                pass

        part = best_of(
            {
                "scope": scope,
                "extract": lambda h=headers: propagate.extract(  # type: ignore[misc]
                    {k: str(v) for k, v in h.items()}
                ),
                "attributes": lambda: {
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": queues.work,
                    "messaging.consumer.group.name": queues.consumer,
                    "messaging.message.id": "e-1",
                    "messaging.message.conversation_id": "c-1",
                    "cloudevents.event_type": "com.tributary.user.created.v2",
                },
            },
            n,
            rounds,
        )
        got |= {f"{k}-{label}": v for k, v in part.items()}
    return [
        Row("3", "span scope of a delivery, sampled", got["scope-sampled"], "bare"),
        Row("3", "span scope of a delivery, unsampled", got["scope-unsampled"], "bare"),
        Row("3", "bare `propagate.extract` of the headers", got["extract-unsampled"]),
        Row("3", "the span's attribute dict alone", got["attributes-unsampled"]),
    ]


# -- 4: SQL statement spans --------------------------------------------------------------------


def figure_sql(n: int, rounds: int) -> list[Row]:
    import sqlalchemy as sa
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    plain, instrumented = sa.create_engine("sqlite://"), sa.create_engine("sqlite://")
    SQLAlchemyInstrumentor().instrument(
        engine=instrumented, skip_dep_check=True, enable_commenter=False
    )
    query = sa.text("SELECT 1")
    try:
        with plain.connect() as a, instrumented.connect() as b, traced(False):
            got = best_of(
                {"plain": lambda: a.execute(query).all(), "spans": lambda: b.execute(query).all()},
                n,
                rounds,
            )
    finally:
        SQLAlchemyInstrumentor().uninstrument()
    return [
        Row("4", "`SELECT 1` on SQLite, not instrumented", got["plain"]),
        Row("4", "`SELECT 1`, instrumented, unsampled trace", got["spans"], "`SELECT 1` on"),
    ]


# -- 5: a FastAPI request ----------------------------------------------------------------------


async def async_bus(request: Request) -> Any:
    return request.app.state.bus


def sync_bus(request: Request) -> Any:
    return request.app.state.bus


def figure_request(n: int, rounds: int) -> list[Row]:
    app = FastAPI()
    app.state.bus = object()

    @app.get("/none")
    async def none() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/async")
    async def with_async(bus: Any = Depends(async_bus)) -> dict[str, bool]:  # noqa: B008
        return {"ok": bus is not None}

    @app.get("/sync")
    async def with_sync(bus: Any = Depends(sync_bus)) -> dict[str, bool]:  # noqa: B008
        return {"ok": bus is not None}

    async def run() -> dict[str, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

            async def per_request(path: str) -> float:
                start = time.process_time()
                for _ in range(n):
                    response = await client.get(path)
                    assert response.status_code == 200
                return (time.process_time() - start) / n * 1e6

            paths = ["/none", "/async", "/sync"]
            best = {p: float("inf") for p in paths}
            for p in paths:
                await client.get(p)
            for r in range(rounds):
                for p in paths[r % 3 :] + paths[: r % 3]:
                    best[p] = min(best[p], await per_request(p))
            return best

    got = asyncio.run(run())
    return [
        Row("5", "GET, no dependency", got["/none"]),
        Row("5", "GET, an async dependency (`get_bus` now)", got["/async"], "GET, no"),
        Row("5", "GET, a sync dependency (thread pool)", got["/sync"], "GET, no"),
    ]


# -- report -------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    """One line a row; a row's ratio is to the row of its figure whose text starts with its
    ``baseline``."""
    lines = [
        "| # | operation | µs CPU | compared with | ratio to it |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if row.baseline and r.figure == row.figure and r.what.startswith(row.baseline)
            ),
            None,
        )
        lines.append(row.line(base))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> str:
    n = 2_000 if args.quick else args.n
    rounds = 3 if args.quick else args.rounds
    install_provider()
    rows = figure_parse(n, rounds)
    rows += figure_outbox(n, rounds)
    rows += figure_consumer(n, rounds)
    rows += figure_sql(n, rounds)
    rows += figure_request(max(n // 10, 200), rounds)
    versions = ", ".join(
        f"{d} {package_version(d)}"
        for d in ("pydantic", "jsonschema", "opentelemetry-sdk", "fastapi", "httpx", "sqlalchemy")
    )
    return "\n".join(
        [
            "### Runtime costs per event and per request",
            "",
            f"`python -m bench.runtime_costs_bench` — {n:,} calls a figure (requests: "
            f"{max(n // 10, 200):,}), best of {rounds} interleaved rounds; µs of CPU of this "
            "process per operation (`time.process_time`). A ratio is to the row named beside it.",
            "",
            table(rows),
            "",
            f"Python {platform.python_version()}, {versions}.",
            f"Run: {run_stamp()}.",
        ]
    )


def cli() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 calls, 3 rounds: a smoke run")
    parser.add_argument("-n", type=int, default=5_000, help="calls per round of a figure")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    print_section(main(args), args.write, MARKER)


if __name__ == "__main__":
    cli()
