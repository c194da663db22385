"""The event timeline in the browser: ``/audit/ui``.

One HTML page, one script and one style sheet from this package (no build step, nothing from
a CDN), reading the JSON API like any client:

- ``POST /audit/ui/login`` trades an API key for an access token at identity's ``POST
  /oauth/token`` on the page's behalf (identity is another origin: the browser could not call
  it without CORS), asking only for ``audit:read audit:verify`` (``audit:read`` alone when the
  key's owner may not verify). The token goes back to the page, which keeps it in memory and
  sends it as ``Authorization: Bearer`` -- the API accepts nothing else, so no cookie ever
  authenticates a request (no CSRF to defend against), and a reload forgets it.
- ``GET /audit/timeline`` (``audit:read``) draws one request: its events in time order, who
  produced each, which consumers answered (an event they produced in reply, audit's own
  record) after how long, which dead-lettered it (reason, attempts, masked error), and the
  trace id to open in Jaeger.

Nothing here reads more than the audit log holds: entries are masked when recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlmodel import col, select

from tributary.audit.models import AuditEntry
from tributary.audit.settings import Settings
from tributary.contracts.catalog import NAMESPACE, CatalogError, catalog
from tributary.service.app import SessionDep
from tributary.service.auth import AuthSettings, public, require
from tributary.service.problems import Problem, unavailable

router = APIRouter(tags=["audit"])

DEAD_LETTERED = "message.dead_lettered"
MAX_TIMELINE = 500
"""Entries of one correlation id drawn at most (the page says when there were more)."""
UI_SCOPES = ("audit:read audit:verify", "audit:read")
LANE_ORDER = ("identity", "onboarding", "email", "notification", "billing", "audit")

_STATIC = resources.files("tributary.audit") / "static"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str, media_type: str) -> Response:
    return Response((_STATIC / name).read_bytes(), media_type=media_type, headers=_HEADERS)


@router.get("/audit/ui", include_in_schema=False, dependencies=[public()])
async def page() -> Response:
    """The page itself: public, it holds no data (the data needs a token)."""
    return _static("index.html", "text/html; charset=utf-8")


@router.get("/audit/ui/app.js", include_in_schema=False, dependencies=[public()])
async def script() -> Response:
    return _static("app.js", "text/javascript; charset=utf-8")


@router.get("/audit/ui/app.css", include_in_schema=False, dependencies=[public()])
async def styles() -> Response:
    return _static("app.css", "text/css; charset=utf-8")


# -- login ----------------------------------------------------------------------------------


class Login(BaseModel):
    api_key: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
    """An API key secret (``trib_…``): printable ASCII, no spaces."""


class Session(BaseModel):
    access_token: str
    expires_in: int
    scope: str


def identity_url(settings: Settings) -> str:
    return (settings.identity_url or AuthSettings().issuer).rstrip("/")


async def exchange(client: httpx.AsyncClient, base: str, api_key: str) -> Session:
    """The key's token narrowed to the page's scopes; a Problem for a refusal (never the key)."""
    for scope in UI_SCOPES:
        form = {"grant_type": "client_credentials", "client_secret": api_key, "scope": scope}
        try:
            answer = await client.post(f"{base}/oauth/token", data=form)
        except httpx.HTTPError:
            raise unavailable("Identity cannot be reached to sign in; retry later.") from None
        body: Any = None
        try:
            body = answer.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if answer.status_code == 200 and isinstance(body, dict):
            try:
                return Session(
                    access_token=str(body["access_token"]),
                    expires_in=int(body["expires_in"]),
                    scope=str(body.get("scope", scope)),
                )
            except (KeyError, TypeError, ValueError):
                break
        if error == "invalid_scope":
            continue  # the owner may not verify: try read alone; may not read: refused below
        if error in {"invalid_client", "invalid_request", "unauthorized_client"}:
            raise Problem(401, "The API key was not accepted.")
        if answer.status_code == 429:
            retry = answer.headers.get("Retry-After", "60")
            raise Problem(429, "Too many sign-ins; retry later.", headers={"Retry-After": retry})
        break
    else:
        raise Problem(403, "The key's owner may not read the audit log (audit:read).")
    raise unavailable("Identity did not answer the sign-in as expected; retry later.")


@router.post(
    "/audit/ui/login",
    response_model=Session,
    include_in_schema=False,
    dependencies=[public()],
)
async def login(request: Request, body: Login) -> Response:
    """Public like identity's token endpoint: the key is the credential (rate limited there)."""
    settings: Settings = request.app.state.audit_settings
    async with httpx.AsyncClient(timeout=5) as client:
        session = await exchange(client, identity_url(settings), body.api_key)
    return Response(
        session.model_dump_json(),
        media_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


# -- the timeline ---------------------------------------------------------------------------


class Hop(BaseModel):
    service: str
    status: Literal["handled", "recorded", "dead_lettered", "unknown"]
    """``handled``: the service published an event caused by this one; ``recorded``: audit's
    entry; ``dead_lettered``: its runtime announced a dead letter; ``unknown``: a consumer the
    catalog names that left no trace in the log (handled without a reply, or not yet)."""
    at: datetime | None = None
    after_ms: int | None = None
    """From the event's time to the consumer's reply (or its record, or its dead letter)."""
    reason: str | None = None
    attempts: int | None = None
    error: str | None = None
    reply: str | None = None
    """The routing key of the event the consumer published in reply."""


class TimelineEvent(BaseModel):
    event_id: str
    type: str
    """The routing key (``user.created.v2``)."""
    producer: str
    """The service that published it (from ``source``), or the source as it is."""
    subject: str | None
    event_time: datetime | None
    """None for an event the log does not hold (every consumer dead-lettered it)."""
    offset_ms: int | None
    """Since the timeline's first event."""
    causation_id: str | None
    seq: int | None
    recorded: bool
    trace_id: str | None
    trace_url: str | None
    consumers: list[Hop]


class DeadLetter(BaseModel):
    seq: int
    service: str
    consumer: str
    queue: str
    message_type: str | None
    message_id: str | None
    reason: str
    attempts: int
    error: str
    at: datetime
    offset_ms: int | None


class Timeline(BaseModel):
    correlation_id: str
    events: list[TimelineEvent]
    dead_letters: list[DeadLetter]
    lanes: list[str]
    """The services on the timeline, in flow order."""
    truncated: bool
    """True when the correlation id has more than ``MAX_TIMELINE`` entries (the first drawn)."""


def producer_of(source: str) -> str:
    prefix = "/services/"
    return source[len(prefix) :] if source.startswith(prefix) else source


def _routing_key(entry: AuditEntry) -> str:
    return entry.type.removeprefix(NAMESPACE + ".")


def _consumers(routing_key: str | None) -> tuple[str, ...]:
    if routing_key is None:
        return ()
    try:
        return catalog().type(catalog().by_routing_key(routing_key).type).consumers
    except (CatalogError, KeyError, ValueError):
        return ()


def _ms(later: datetime | None, earlier: datetime | None) -> int | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier).total_seconds() * 1000)


@dataclass
class _Row:
    event: TimelineEvent
    hops: dict[str, Hop] = field(default_factory=dict)


def _dead_letter(entry: AuditEntry) -> DeadLetter | None:
    data = entry.data
    try:
        return DeadLetter(
            seq=entry.seq,
            service=str(data["service"]),
            consumer=str(data["consumer"]),
            queue=str(data["queue"]),
            message_type=data.get("message_type"),
            message_id=data.get("message_id"),
            reason=str(data["reason"]),
            attempts=int(data["attempts"]),
            error=str(data.get("error", "")),
            at=datetime.fromisoformat(str(data["dead_lettered_at"]).replace("Z", "+00:00")),
            offset_ms=None,
        )
    except (KeyError, TypeError, ValueError):
        return None


def build_timeline(
    correlation_id: str, entries: list[AuditEntry], *, jaeger_url: str, truncated: bool = False
) -> Timeline:
    """One request's entries as rows of events with a hop per consumer (pure: testable)."""
    base = jaeger_url.rstrip("/")
    rows: dict[str, _Row] = {}
    dead: list[DeadLetter] = []
    for entry in entries:
        key = _routing_key(entry)
        if key.startswith(DEAD_LETTERED + "."):
            letter = _dead_letter(entry)
            if letter is not None:
                dead.append(letter)
            continue
        if entry.event_id in rows:
            continue
        rows[entry.event_id] = _Row(
            TimelineEvent(
                event_id=entry.event_id,
                type=key,
                producer=producer_of(entry.source),
                subject=entry.subject,
                event_time=entry.event_time,
                offset_ms=None,
                causation_id=entry.causation_id,
                seq=entry.seq,
                recorded=True,
                trace_id=entry.trace_id,
                trace_url=f"{base}/trace/{entry.trace_id}" if entry.trace_id else None,
                consumers=[],
            )
        )
        row = rows[entry.event_id]
        row.hops["audit"] = Hop(
            service="audit",
            status="recorded",
            at=entry.recorded_at,
            after_ms=_ms(entry.recorded_at, entry.event_time),
        )
    # replies: an event caused by another one is its producer's answer to it
    for row in list(rows.values()):
        cause = rows.get(row.event.causation_id or "")
        if cause is None or row.event.producer in cause.hops:
            continue
        cause.hops[row.event.producer] = Hop(
            service=row.event.producer,
            status="handled",
            at=row.event.event_time,
            after_ms=_ms(row.event.event_time, cause.event.event_time),
            reply=row.event.type,
        )
    # dead letters: on the event they are about (one the log lacks gets a row of its own)
    for letter in dead:
        target = rows.get(letter.message_id or "")
        if target is None:
            target = rows[letter.message_id or f"dead-letter-{letter.seq}"] = _Row(
                TimelineEvent(
                    event_id=letter.message_id or "",
                    type=letter.message_type or "unknown",
                    producer="unknown",
                    subject=None,
                    event_time=None,
                    offset_ms=None,
                    causation_id=None,
                    seq=None,
                    recorded=False,
                    trace_id=None,
                    trace_url=None,
                    consumers=[],
                )
            )
        target.hops[letter.service] = Hop(
            service=letter.service,
            status="dead_lettered",
            at=letter.at,
            after_ms=_ms(letter.at, target.event.event_time),
            reason=letter.reason,
            attempts=letter.attempts,
            error=letter.error,
        )
    times = [r.event.event_time for r in rows.values() if r.event.event_time is not None]
    times += [d.at for d in dead]
    start = min(times) if times else None
    for letter in dead:
        letter.offset_ms = _ms(letter.at, start)
    events: list[TimelineEvent] = []
    lanes: set[str] = set()
    for row in rows.values():
        expected = _consumers(row.event.type)
        for service in expected:
            row.hops.setdefault(service, Hop(service=service, status="unknown"))
        first = row.event.event_time or min(
            (h.at for h in row.hops.values() if h.at is not None), default=None
        )
        row.event.offset_ms = _ms(first, start)
        row.event.consumers = sorted(row.hops.values(), key=lambda h: _lane_key(h.service))
        lanes |= set(row.hops) | {row.event.producer}
        events.append(row.event)
    events.sort(key=lambda e: (e.offset_ms is None, e.offset_ms or 0, e.seq or 0))
    lanes.discard("unknown")
    return Timeline(
        correlation_id=correlation_id,
        events=events,
        dead_letters=sorted(dead, key=lambda d: (d.at, d.seq)),
        lanes=sorted(lanes, key=_lane_key),
        truncated=truncated,
    )


def _lane_key(service: str) -> tuple[int, str]:
    order = LANE_ORDER.index(service) if service in LANE_ORDER else len(LANE_ORDER)
    return (order, service)


@router.get("/audit/timeline", response_model=Timeline, dependencies=[require("audit:read")])
async def timeline(
    request: Request,
    session: SessionDep,
    correlation_id: Annotated[str, Query(min_length=1, max_length=200)],
) -> Timeline:
    """One request's events as a timeline: producer, consumers and the time of each hop, dead
    letters with their reason and attempts, the trace id (and its Jaeger link)."""
    settings: Settings = request.app.state.audit_settings
    query = (
        select(AuditEntry)
        .where(col(AuditEntry.correlation_id) == correlation_id)
        .order_by(col(AuditEntry.seq))
        .limit(MAX_TIMELINE + 1)
    )
    rows = list((await session.exec(query)).all())
    return build_timeline(
        correlation_id,
        rows[:MAX_TIMELINE],
        jaeger_url=settings.jaeger_url,
        truncated=len(rows) > MAX_TIMELINE,
    )
