"""The hash chain: every entry's hash covers its fields and the hash of the entry before it.

Appending reads the last entry and inserts the next one in the caller's transaction. The
chain never forks: on PostgreSQL a transaction-level advisory lock serializes appenders of
every replica until they commit; SQLite has one writer at a time; and ``prev_hash`` is
unique, so an append that raced anyway fails (and is retried by the runtime) instead of
branching.

The head (last entry, last checkpoint) is read once per transaction, in one statement, and then
kept up to date by the appends of that transaction: a group commit of *k* events reads it once,
not *k* times, and takes the advisory lock once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.audit.models import AuditCheckpoint, AuditEntry, CheckpointRef, Verification
from tributary.contracts.audit_chain import (
    GENESIS,
    checkpoint_message,
    hash_fields,
    instant,
    unb64,
)
from tributary.contracts.audit_chain import canonical_json as canonical_json

__all__ = [
    "GENESIS",
    "append",
    "append_row",
    "canonical_json",
    "entry_hash",
    "head",
    "row_hash",
    "signature_holds",
    "verify",
]

CHAIN_LOCK = 0x7472_6962_6175_6400
"""PostgreSQL advisory lock key held by whoever is appending (``"tribaud\\0"``)."""

VERIFY_PAGE = 500


HASHED = (
    "seq",
    "event_id",
    "type",
    "data_type",
    "source",
    "subject",
    "correlation_id",
    "causation_id",
    "event_time",
    "recorded_at",
    "data",
)
"""The columns an entry's hash covers, with ``prev_hash`` (not ``trace_id``)."""


def row_hash(row: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of the canonical JSON of ``prev_hash`` and every hashed field of ``row``
    (a mapping of column names to values, as :func:`append_row` inserts it)."""
    return hash_fields(
        {
            "prev_hash": prev_hash,
            "seq": row["seq"],
            "event_id": row["event_id"],
            "type": row["type"],
            "data_type": row["data_type"],
            "source": row["source"],
            "subject": row["subject"],
            "correlation_id": row["correlation_id"],
            "causation_id": row["causation_id"],
            "event_time": instant(row["event_time"]),
            "recorded_at": instant(row["recorded_at"]),
            "data": row["data"],
        }
    )


def entry_hash(entry: AuditEntry, prev_hash: str) -> str:
    """SHA-256 (hex) of the canonical JSON of ``prev_hash`` and every field of ``entry``."""
    return row_hash({name: getattr(entry, name) for name in HASHED}, prev_hash)


@dataclass
class Head:
    """The chain as the current transaction sees it: its last entry and last checkpoint."""

    transaction: object
    connection: AsyncConnection
    """The session's connection in that transaction (the appends insert on it)."""
    seq: int
    hash: str
    checkpointed: int
    """``seq`` of the last checkpoint (0: none)."""


_HEAD = "tributary.audit.head"

_LOCK = sa.select(func.pg_advisory_xact_lock(CHAIN_LOCK))
_READ_HEAD = (
    sa.select(
        col(AuditEntry.seq),
        col(AuditEntry.hash),
        sa.select(func.max(AuditCheckpoint.seq)).scalar_subquery(),
    )
    .order_by(col(AuditEntry.seq).desc())
    .limit(1)
)


async def head(session: AsyncSession) -> Head:
    """The chain's head, read (under the advisory lock on PostgreSQL) on first use in a
    transaction; :func:`append` and the checkpointer keep it current until the transaction
    ends. A new transaction (after a commit or a rollback) reads it again."""
    transaction = session.sync_session.get_transaction()
    known = session.info.get(_HEAD)
    if isinstance(known, Head) and transaction is not None and known.transaction is transaction:
        return known
    # Core statements built once, on the session's connection: the ORM's execute path (and
    # its autoflush) is not needed to read two columns
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        await connection.execute(_LOCK)
    last = (await connection.execute(_READ_HEAD)).first()
    found = Head(
        transaction=session.sync_session.get_transaction(),
        connection=connection,
        seq=last[0] if last else 0,
        hash=last[1] if last else GENESIS,
        checkpointed=int(last[2] or 0) if last else 0,
    )
    session.info[_HEAD] = found
    return found


_INSERT = AuditEntry.__table__.insert()  # type: ignore[attr-defined]

COLUMNS = (*HASHED, "prev_hash", "hash", "trace_id")
"""Every column of ``audit_entries``: the keys of a row for :func:`append_row`."""


async def append_row(session: AsyncSession, row: dict[str, Any]) -> dict[str, Any]:
    """Number ``row`` (every column of :data:`COLUMNS` but ``seq``, ``prev_hash`` and
    ``hash``), link it to the last entry and insert it (not committed); return it completed.

    A plain Core INSERT on the transaction's connection: no ORM object is built or flushed.
    """
    last = await head(session)
    row["seq"] = last.seq + 1
    row["prev_hash"] = last.hash
    row["hash"] = row_hash(row, last.hash)
    await last.connection.execute(_INSERT, row)
    last.seq, last.hash = row["seq"], row["hash"]
    return row


async def append(session: AsyncSession, entry: AuditEntry) -> AuditEntry:
    """Number ``entry``, link it to the last entry and insert it (not committed); ``entry``
    gets its ``seq``, ``prev_hash`` and ``hash`` but is not added to the session."""
    row = await append_row(session, {name: getattr(entry, name) for name in COLUMNS})
    entry.seq, entry.prev_hash, entry.hash = row["seq"], row["prev_hash"], row["hash"]
    return entry


async def _in_order(session: AsyncSession, after: int = 0) -> AsyncIterator[AuditEntry]:
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


def signature_holds(public_key: str, seq: int, head: str, signed_at: datetime, sig: str) -> bool:
    """Whether ``sig`` is the signature of ``public_key`` (base64url raw) over the checkpoint."""
    try:
        key = Ed25519PublicKey.from_public_bytes(unb64(public_key))
        key.verify(unb64(sig), checkpoint_message(seq, head, signed_at))
    except (ValueError, InvalidSignature):
        return False
    return True


async def _trusted_checkpoints(
    session: AsyncSession, public_key: str | None, after: int
) -> dict[int, str] | Verification:
    """Heads by seq of the checkpoints after ``after`` signed with ``public_key``; a
    Verification if one of them carries a signature that does not hold (a forged row)."""
    if public_key is None:
        return {}
    rows = (
        await session.exec(
            select(AuditCheckpoint)
            .where(col(AuditCheckpoint.seq) > after)
            .where(col(AuditCheckpoint.public_key) == public_key)
            .order_by(col(AuditCheckpoint.seq))
        )
    ).all()
    heads: dict[int, str] = {}
    for row in rows:
        if not signature_holds(public_key, row.seq, row.head, row.signed_at, row.signature):
            return Verification(
                ok=False,
                entries=0,
                broken_at=row.seq,
                reason=f"checkpoint {row.seq}'s signature does not hold: it was forged",
            )
        heads[row.seq] = row.head
    return heads


async def verify(
    session: AsyncSession,
    *,
    public_key: str | None = None,
    known: CheckpointRef | None = None,
    full: bool = False,
) -> Verification:
    """Recompute the chain and check it reaches every signed checkpoint's head.

    ``public_key`` (base64url raw Ed25519) selects the checkpoints to trust: those of the
    table signed with it. ``known`` is a checkpoint verified before (kept outside the
    database): unless ``full``, verification starts there when the entry at its seq still
    has its head, and it counts as a checkpoint even if its row is gone. Report the first
    entry that breaks the chain: a bad link, or, when the links hold but do not reach a
    checkpoint's head (rewritten and re-hashed, reordered), the first entry after the last
    checkpoint that still holds; entries missing up to a checkpoint are a truncation.
    """
    start_seq, start_hash = 0, GENESIS
    if known is not None and not full:
        at = (
            await session.exec(select(AuditEntry.hash).where(col(AuditEntry.seq) == known.seq))
        ).first()
        if at == known.head:
            start_seq, start_hash = known.seq, known.head
    heads = await _trusted_checkpoints(session, public_key, start_seq)
    if isinstance(heads, Verification):
        return heads
    if known is not None and known.seq > start_seq:
        heads.setdefault(known.seq, known.head)
    checked = start_seq
    prev_seq, prev_hash = start_seq, start_hash
    good: CheckpointRef | None = (
        CheckpointRef(seq=start_seq, head=start_hash) if start_seq else None
    )
    async for entry in _in_order(session, start_seq):
        reason = None
        broken_at = entry.seq
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
        elif entry.seq in heads and heads[entry.seq] != entry.hash:
            first = good.seq + 1 if good is not None else 1
            reason = (
                f"the chain does not reach the head checkpoint {entry.seq} signed: an entry "
                f"from {first} to {entry.seq} was rewritten, reordered or replaced"
            )
            broken_at, checked = first, first - 1
        if reason is not None:
            return Verification(
                ok=False, entries=checked, broken_at=broken_at, reason=reason, checkpoint=good
            )
        if entry.seq in heads:
            good = CheckpointRef(seq=entry.seq, head=entry.hash)
        checked = entry.seq
        prev_seq, prev_hash = entry.seq, entry.hash
    beyond = [seq for seq in heads if seq > prev_seq]
    if beyond:
        last = max(beyond)
        return Verification(
            ok=False,
            entries=checked,
            broken_at=prev_seq + 1,
            reason=f"entries {prev_seq + 1} to {last} are missing: checkpoint {last} "
            "signed a longer chain (the log was cut short)",
            checkpoint=good,
        )
    return Verification(
        ok=True, entries=checked, head=prev_hash if checked else None, checkpoint=good
    )
