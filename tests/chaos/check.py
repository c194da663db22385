"""The invariants a soak must end with, read from every service's public API and the broker.

Per accepted sign-up: one user (identity), one workspace (onboarding), one welcome email sent
(email's API) and one mail in the SMTP sink, and exactly its three events in the audit log
(``user.created``, ``workspace.created``, ``email.sent``, by correlation id). The audit chain
verifies, holds every event once and nothing else. Every queue of the stack is empty, DLQs
included, with one consumer on each work queue; no outbox row is left unpublished.

No service lists its outbox over HTTP: ``tributary_outbox_pending`` on ``/metrics`` is read,
and so are the services' own databases (``tributary_outbox``), to match every event a producer
committed with the audit log. That is the one place the checker reads a database directly.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.message import Message
from functools import partial
from typing import Any, TypeVar

import httpx
from sqlalchemy import text

from tributary.messaging.db import create_engine

from ..stack import SIGNUP_SERVICES, Stack
from .load import SignUp

T = TypeVar("T")

SIGNUP_EVENTS = Counter(
    {
        "com.tributary.user.created.v1": 1,
        "com.tributary.workspace.created.v1": 1,
        "com.tributary.email.sent.v1": 1,
    }
)
_GAUGE = re.compile(r"^(tributary_\w+)\{([^}]*)\} (\S+)$")
EXAMPLES = 5


@dataclass
class Findings:
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def expect(self, what: str, bad: list[str], total: int | None = None) -> None:
        """One problem line for ``bad`` (with a few examples), nothing when it is empty."""
        if bad:
            scope = f" of {total}" if total is not None else ""
            examples = "; ".join(bad[:EXAMPLES]) + (" ..." if len(bad) > EXAMPLES else "")
            self.problems.append(f"{what}: {len(bad)}{scope} wrong: {examples}")

    @property
    def ok(self) -> bool:
        return not self.problems


async def limited(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = 16) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


def parse_metrics(body: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in body.splitlines():
        if match := _GAUGE.match(line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


class Checker:
    def __init__(self, stack: Stack, queues: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.stack = stack
        self.queues = queues
        """The broker's view (``RabbitNode.queues``): name -> messages, ..., consumers."""
        self._clients: dict[str, httpx.AsyncClient] = {}

    # -- quiescence -----------------------------------------------------------------------------

    async def quiesce(self, timeout: float, say: Callable[[str], None]) -> bool:
        """Wait until nothing moves: every non-DLQ queue empty, every outbox drained, and the
        audit log the same size twice in a row. False if ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        previous: tuple[int, ...] | None = None
        last_said = 0.0
        while time.monotonic() < deadline:
            state = await self._motion()
            busy = state[:-1]
            if not any(busy) and state == previous:
                return True
            previous = state
            if time.monotonic() - last_said > 15:
                say(f"  settling: queued {busy[0]}, outbox {busy[1]}, audit entries {state[-1]}")
                last_said = time.monotonic()
            await asyncio.sleep(1.0)  # a poll interval: the broker query itself takes ~1 s
        return False

    async def _motion(self) -> tuple[int, ...]:
        queued = sum(
            q["messages"]
            for name, q in (await asyncio.to_thread(self.queues)).items()
            if not name.endswith(".dlq")
        )
        try:
            pending = sum((await self.outbox_pending()).values())
            entries = int((await self.get("audit", "/audit/verify"))["entries"])
        except (httpx.HTTPError, KeyError, ValueError):
            return (queued, -1, -1)
        return (queued, pending, entries)

    # -- reading --------------------------------------------------------------------------------

    def client(self, service: str) -> httpx.AsyncClient:
        if service not in self._clients:
            self._clients[service] = httpx.AsyncClient(
                base_url=self.stack.url(service), timeout=30, auth=self.stack.auth()
            )
        return self._clients[service]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def get(self, service: str, path: str, **params: Any) -> Any:
        response = await self.client(service).get(path, params=params)
        response.raise_for_status()
        return response.json()

    async def metrics(self, service: str) -> list[tuple[str, dict[str, str], float]]:
        response = await self.client(service).get("/metrics")
        response.raise_for_status()
        return parse_metrics(response.text)

    async def outbox_pending(self) -> dict[str, int]:
        pending = {}
        for service in SIGNUP_SERVICES:
            for name, _labels, value in await self.metrics(service):
                if name == "tributary_outbox_pending":
                    pending[service] = int(value)
        return pending

    async def audit_entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        after = 0
        while True:
            page = await self.get("audit", "/audit", after_seq=after, limit=500)
            entries += page["entries"]
            if page["next"] is None:
                return entries
            after = entries[-1]["seq"]

    async def outbox_rows(self, service: str) -> list[tuple[str, str, bool]]:
        """(event id, routing key, published) of every row in ``service``'s outbox."""
        engine = create_engine(self.stack.database_urls[service])
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    text("SELECT event_id, routing_key, published_at FROM tributary_outbox")
                )
                return [(r[0], r[1], r[2] is not None) for r in rows]
        finally:
            await engine.dispose()

    # -- the invariants -------------------------------------------------------------------------

    async def check(self, accepted: list[SignUp], mail_windows: int) -> Findings:
        """Every invariant; ``mail_windows`` bounds the mails allowed to be sent twice."""
        found = Findings()
        found.counts["sign-ups accepted"] = len(accepted)
        await self._users(accepted, found)
        await self._workspaces(accepted, found)
        await self._emails(accepted, found)
        self._mail(accepted, mail_windows, found)
        audited = await self._audit(accepted, found)
        await self._outbox(audited, found)
        self._broker(found)
        await self._consumed(found)
        return found

    async def _users(self, accepted: list[SignUp], found: Findings) -> None:
        async def user(s: SignUp) -> tuple[SignUp, Any]:
            response = await self.client("identity").get(f"/users/{s.user_id}")
            return s, response.json() if response.status_code == 200 else None

        results = await limited([partial(user, s) for s in accepted])
        bad = [f"{s.key}: {s.user_id} missing" for s, u in results if u is None]
        bad += [f"{s.key}: wrong email" for s, u in results if u and u["email"] != s.email]
        ids = Counter(s.user_id for s in accepted)
        bad += [f"{uid} answered for {n} sign-ups" for uid, n in ids.items() if n > 1]
        found.counts["users"] = sum(u is not None for _, u in results)
        found.expect("one user per sign-up (GET /users/{id})", bad, len(accepted))

    async def _workspaces(self, accepted: list[SignUp], found: Findings) -> None:
        results = await limited(
            [partial(self.get, "onboarding", "/workspaces", owner_id=s.user_id) for s in accepted]
        )
        pairs = zip(accepted, results, strict=True)
        bad = [f"{s.key}: {len(w)} workspaces" for s, w in pairs if len(w) != 1]
        found.counts["workspaces"] = sum(len(w) for w in results)
        found.expect("one workspace per sign-up (GET /workspaces)", bad, len(accepted))

    async def _emails(self, accepted: list[SignUp], found: Findings) -> None:
        calls = [partial(self.get, "email", "/emails", to=s.email) for s in accepted]
        results = await limited(calls)
        bad = []
        for s, rows in zip(accepted, results, strict=True):
            states = sorted(f"{r['template']}/{r['status']}" for r in rows)
            if states != ["welcome/sent"]:
                bad.append(f"{s.key}: {states}")
        found.counts["welcome emails recorded sent"] = sum(
            1 for rows in results for r in rows if r["status"] == "sent"
        )
        found.expect("one welcome email sent per sign-up (GET /emails)", bad, len(accepted))

    def _mail(self, accepted: list[SignUp], windows: int, found: Findings) -> None:
        """One mail per address in the SMTP sink. A second copy with the same Message-ID is the
        documented window (SMTP accepted the mail, then the process died or its commit failed):
        tolerated at most once per ``windows`` (SIGKILLs of email, database outages), reported."""
        by_to: dict[str, list[Message]] = defaultdict(list)
        for message in list(self.stack.mail.messages):
            by_to[str(message.get("To", ""))].append(message)
        bad, resent = [], 0
        for s in accepted:
            copies = by_to.pop(s.email, [])
            ids = {str(m.get("Message-ID")) for m in copies}
            if len(ids) != 1:
                bad.append(f"{s.key}: {len(copies)} mails, {len(ids)} Message-IDs")
            resent += len(copies) - 1 if len(ids) == 1 else 0
        bad += [f"mail to an address no sign-up used: {len(v)}" for v in by_to.values()]
        found.counts["mails in the SMTP sink"] = len(self.stack.mail.messages)
        found.counts["mails resent with the same Message-ID"] = resent
        if resent:
            found.notes.append(
                f"{resent} welcome mail(s) resent with the same Message-ID; {windows} SIGKILL(s) "
                "of email or database outage(s) could each cause one (the documented window: "
                "SMTP accepted, then the commit never happened)"
            )
        if resent > windows:
            bad.append(f"{resent} copies resent, more than the {windows} possible windows")
        found.expect("one welcome mail per sign-up (SMTP sink)", bad, len(accepted))

    async def _audit(self, accepted: list[SignUp], found: Findings) -> set[str]:
        entries = await self.audit_entries()
        verify = await self.get("audit", "/audit/verify")
        found.counts["audit entries"] = len(entries)
        if not verify.get("ok") or verify.get("entries") != len(entries):
            found.problems.append(f"/audit/verify: {verify} for {len(entries)} entries read")
        ids = Counter(e["event_id"] for e in entries)
        found.expect(
            "every event once in the audit chain",
            [f"{i} recorded {n} times" for i, n in ids.items() if n > 1],
            len(ids),
        )
        by_correlation: dict[str, Counter[str]] = defaultdict(Counter)
        for entry in entries:
            by_correlation[entry["correlation_id"] or ""][entry["type"]] += 1
        bad = []
        for s in accepted:
            types = by_correlation.pop(s.key, Counter())
            if types != SIGNUP_EVENTS:
                bad.append(f"{s.key}: {dict(types)}")
        bad += [f"unknown correlation {k!r}: {dict(v)}" for k, v in by_correlation.items()]
        found.expect("the sign-up's three events audited once each", bad, len(accepted))
        return set(ids)

    async def _outbox(self, audited: set[str], found: Findings) -> None:
        pending = await self.outbox_pending()
        found.expect(
            "tributary_outbox_pending is 0 (/metrics)",
            [f"{s}: {n}" for s, n in pending.items() if n],
        )
        rows = [row for s in SIGNUP_SERVICES for row in await self.outbox_rows(s)]
        found.counts["outbox events"] = len(rows)
        found.counts["outbox rows unpublished"] = sum(not published for _, _, published in rows)
        found.expect(
            "no outbox row unpublished (databases)",
            [f"{event_id} ({key})" for event_id, key, published in rows if not published],
            len(rows),
        )
        # audit's signed checkpoints are about the chain, not recorded in it (no checkpoint of a
        # checkpoint): every other event produced must be audited
        checkpoints = {e for e, key, _ in rows if key.startswith("audit.checkpoint.")}
        found.counts["audit checkpoints published"] = len(checkpoints)
        produced = {event_id for event_id, _, _ in rows} - checkpoints
        found.expect("every produced event audited", sorted(produced - audited), len(produced))
        found.expect("only produced events audited", sorted(audited - produced), len(audited))

    def _broker(self, found: Findings) -> None:
        queues = self.queues()
        prefix = self.stack.prefix
        ours = {n: q for n, q in queues.items() if n.startswith(prefix)}
        dlq = {n: q["messages"] for n, q in ours.items() if n.endswith(".dlq")}
        found.counts["dead-lettered (DLQ messages)"] = sum(dlq.values())
        found.expect("all DLQs empty", [f"{n}: {m}" for n, m in dlq.items() if m])
        found.expect(
            "every other queue empty",
            [
                f"{n}: {q['messages']} (ready {q['messages_ready']}, "
                f"unacked {q['messages_unacknowledged']}, consumers {q['consumers']})"
                for n, q in ours.items()
                if q["messages"] and n not in dlq
            ],
        )
        work = [n for n in ours if n.endswith(".events") or n == f"{prefix}email.send"]
        found.expect(
            "one consumer on each work queue",
            [f"{n}: {ours[n]['consumers']}" for n in work if ours[n]["consumers"] != 1],
        )
        found.expect("a queue per service and command", [] if len(work) == 5 else [str(work)])

    async def _consumed(self, found: Findings) -> None:
        """Outcome counters since each service last started (restarts reset them): notes only."""
        outcomes: Counter[str] = Counter()
        for service in SIGNUP_SERVICES:
            for name, labels, value in await self.metrics(service):
                if name == "tributary_events_consumed_total":
                    outcomes[labels.get("outcome", "?")] += int(value)
        found.notes.append(
            "deliveries since each service's last start: "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        )
