"""The hash chain: every entry's hash covers its fields and the hash of the entry before it.

Appending reads the last entry and inserts the next one in the caller's transaction. The
chain never forks: on PostgreSQL a transaction-level advisory lock serializes appenders of
every replica until they commit; SQLite has one writer at a time; and ``prev_hash`` is
unique, so an append that raced anyway fails (and is retried by the runtime) instead of
branching.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.audit.models import AuditEntry, Verification
from tributary.messaging.db import as_utc

GENESIS = "0" * 64
"""The ``prev_hash`` of the first entry."""

CHAIN_LOCK = 0x7472_6962_6175_6400
"""PostgreSQL advisory lock key held by whoever is appending (``"tribaud\\0"``)."""

VERIFY_PAGE = 500


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 as is: the same bytes for the same content everywhere."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _instant(value: datetime) -> str:
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(entry: AuditEntry, prev_hash: str) -> str:
    """SHA-256 (hex) of the canonical JSON of ``prev_hash`` and every field of ``entry``."""
    fields = {
        "prev_hash": prev_hash,
        "seq": entry.seq,
        "event_id": entry.event_id,
        "type": entry.type,
        "data_type": entry.data_type,
        "source": entry.source,
        "subject": entry.subject,
        "correlation_id": entry.correlation_id,
        "causation_id": entry.causation_id,
        "event_time": _instant(entry.event_time),
        "recorded_at": _instant(entry.recorded_at),
        "data": entry.data,
    }
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


async def append(session: AsyncSession, entry: AuditEntry) -> AuditEntry:
    """Number ``entry``, link it to the last entry and insert it (not committed)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.exec(select(func.pg_advisory_xact_lock(CHAIN_LOCK)))
    # flushed entries of this transaction count: a group commit appends many in order
    last = (
        await session.exec(
            select(AuditEntry.seq, AuditEntry.hash).order_by(col(AuditEntry.seq).desc()).limit(1)
        )
    ).first()
    seq, prev_hash = (last[0] + 1, last[1]) if last is not None else (1, GENESIS)
    entry.seq = seq
    entry.prev_hash = prev_hash
    entry.hash = entry_hash(entry, prev_hash)
    session.add(entry)
    await session.flush()
    return entry


async def _in_order(session: AsyncSession) -> AsyncIterator[AuditEntry]:
    after = 0
    while True:
        page = (
            await session.exec(
                select(AuditEntry)
                .where(col(AuditEntry.seq) > after)
                .order_by(col(AuditEntry.seq))
                .limit(VERIFY_PAGE)
            )
        ).all()
        for entry in page:
            yield entry
        if len(page) < VERIFY_PAGE:
            return
        after = page[-1].seq
        session.expunge_all()


def _gap(expected: int, found: int) -> str:
    if found < expected:
        return f"seq {found} is out of sequence (expected {expected})"
    if found == expected + 1:
        return f"entry {expected} is missing"
    return f"entries {expected} to {found - 1} are missing"


async def verify(session: AsyncSession) -> Verification:
    """Recompute the chain from the first entry; report the first link that does not hold."""
    checked = 0
    prev_seq, prev_hash = 0, GENESIS
    async for entry in _in_order(session):
        reason = None
        if entry.seq != prev_seq + 1:
            reason = _gap(prev_seq + 1, entry.seq)
        elif entry.prev_hash != prev_hash:
            reason = (
                "prev_hash does not match the hash of the entry before it"
                if prev_seq
                else "the first entry does not start the chain"
            )
        elif entry_hash(entry, prev_hash) != entry.hash:
            reason = "the entry's content does not match its hash"
        if reason is not None:
            return Verification(ok=False, entries=checked, broken_at=entry.seq, reason=reason)
        checked += 1
        prev_seq, prev_hash = entry.seq, entry.hash
    return Verification(ok=True, entries=checked, head=prev_hash if checked else None)
