"""``eventctl audit verify``: check an audit database offline against published checkpoints.

The checkpoints (``audit.checkpoint.v1`` events) come from a file of JSON lines: CloudEvents
as captured from the bus, or ``eventctl dlq archive`` records (``body_base64``). Other event
types in the file are skipped; a line that is not JSON, or an ``audit.checkpoint`` whose data
does not follow its schema, is an error naming the line. The chain is recomputed from the
first entry; it must reach every checkpoint's head, and every checkpoint's signature must
hold under the public key (``--public-key``, or the one the checkpoints carry, reported so
that it can be compared with ``GET /audit/checkpoints/key``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from tributary.contracts.audit_chain import (
    GENESIS,
    checkpoint_message,
    hash_fields,
    instant,
    key_id,
    unb64,
)
from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.events import AuditCheckpointV1
from tributary.messaging.db import UtcDateTime, create_engine

EXIT_OK, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2
CHECKPOINT_TYPE = f"{NAMESPACE}.{AuditCheckpointV1.routing_key}"
PAGE = 1000

_ENTRIES = sa.Table(
    "audit_entries",
    sa.MetaData(),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("event_id", sa.String),
    sa.Column("type", sa.String),
    sa.Column("data_type", sa.String),
    sa.Column("source", sa.String),
    sa.Column("subject", sa.String),
    sa.Column("correlation_id", sa.String),
    sa.Column("causation_id", sa.String),
    sa.Column("event_time", UtcDateTime()),
    sa.Column("recorded_at", UtcDateTime()),
    sa.Column("data", sa.JSON),
    sa.Column("prev_hash", sa.String),
    sa.Column("hash", sa.String),
)


class CheckpointFileError(ValueError):
    """A line of the checkpoints file is neither skippable nor a valid checkpoint."""


def parse_checkpoint_line(line: str, number: int = 1) -> AuditCheckpointV1 | None:
    """The checkpoint on one line; None for a blank line or another event type."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        raise CheckpointFileError(f"line {number}: not JSON") from None
    if not isinstance(record, dict):
        raise CheckpointFileError(f"line {number}: not a JSON object")
    if "body_base64" in record:  # an eventctl dlq archive record
        body = record["body_base64"]
        try:
            if not isinstance(body, str):
                raise ValueError
            record = json.loads(base64.b64decode(body, validate=True))
        except (ValueError, binascii.Error, RecursionError):
            raise CheckpointFileError(f"line {number}: body_base64 is not a JSON body") from None
        if not isinstance(record, dict):
            raise CheckpointFileError(f"line {number}: the archived body is not a JSON object")
    if record.get("type") != CHECKPOINT_TYPE:
        if isinstance(record.get("type"), str):
            return None  # another event: archives and captures mix them
        raise CheckpointFileError(f"line {number}: not a CloudEvent (no type)")
    try:
        return AuditCheckpointV1.model_validate(record.get("data"))
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "data" for e in exc.errors()})
        raise CheckpointFileError(
            f"line {number}: not a valid {AuditCheckpointV1.routing_key}: {', '.join(fields)}"
        ) from None


def load_checkpoints(path: Path) -> list[AuditCheckpointV1]:
    found: dict[int, AuditCheckpointV1] = {}
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if (cp := parse_checkpoint_line(line, number)) is not None:
                if cp.seq in found and found[cp.seq].head != cp.head:
                    raise CheckpointFileError(
                        f"line {number}: two checkpoints for seq {cp.seq} with different "
                        "heads (one of them is forged)"
                    )
                found.setdefault(cp.seq, cp)
    return [found[seq] for seq in sorted(found)]


def signature_holds(public_key: str, cp: AuditCheckpointV1) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(unb64(public_key))
        key.verify(unb64(cp.signature), checkpoint_message(cp.seq, cp.head, cp.signed_at))
    except (ValueError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class Outcome:
    ok: bool
    entries: int
    message: str
    broken_at: int | None = None


def _entry_hash(row: Any, prev_hash: str) -> str:
    data = row.data if not isinstance(row.data, str) else json.loads(row.data)
    return hash_fields(
        {
            "prev_hash": prev_hash,
            "seq": row.seq,
            "event_id": row.event_id,
            "type": row.type,
            "data_type": row.data_type,
            "source": row.source,
            "subject": row.subject,
            "correlation_id": row.correlation_id,
            "causation_id": row.causation_id,
            "event_time": instant(row.event_time),
            "recorded_at": instant(row.recorded_at),
            "data": data,
        }
    )


async def _rows(database_url: str) -> AsyncIterator[Any]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            after = 0
            while True:
                query = (
                    sa.select(_ENTRIES)
                    .where(_ENTRIES.c.seq > after)
                    .order_by(_ENTRIES.c.seq)
                    .limit(PAGE)
                )
                page = (await conn.execute(query)).all()
                for row in page:
                    yield row
                if len(page) < PAGE:
                    return
                after = page[-1].seq
    finally:
        await engine.dispose()


async def verify_offline(
    database_url: str, checkpoints: list[AuditCheckpointV1], public_key: str
) -> Outcome:
    """Recompute the chain; it must reach the head of every checkpoint signed by the key."""
    heads: dict[int, str] = {}
    for cp in checkpoints:
        if cp.public_key != public_key or not signature_holds(public_key, cp):
            return Outcome(
                False, 0, f"checkpoint {cp.seq}: its signature does not hold under the key"
            )
        heads[cp.seq] = cp.head
    prev_seq, prev_hash, good = 0, GENESIS, 0
    async for row in _rows(database_url):
        reason = None
        broken_at = row.seq
        if row.seq != prev_seq + 1:
            reason = f"entry {prev_seq + 1} is missing or out of sequence (found {row.seq})"
            broken_at = prev_seq + 1
        elif row.prev_hash != prev_hash:
            reason = "prev_hash does not match the hash of the entry before it"
        elif _entry_hash(row, prev_hash) != row.hash:
            reason = "the entry's content does not match its hash"
        elif row.seq in heads and heads[row.seq] != row.hash:
            broken_at = good + 1
            reason = (
                f"the chain does not reach the head checkpoint {row.seq} signed: an entry "
                f"from {good + 1} to {row.seq} was rewritten, reordered or replaced"
            )
        if reason is not None:
            return Outcome(False, broken_at - 1, reason, broken_at)
        if row.seq in heads:
            good = row.seq
        prev_seq, prev_hash = row.seq, row.hash
    if heads and max(heads) > prev_seq:
        last = max(heads)
        return Outcome(
            False,
            prev_seq,
            f"entries {prev_seq + 1} to {last} are missing: checkpoint {last} signed a "
            "longer chain (the log was cut short)",
            prev_seq + 1,
        )
    note = f"; last checkpoint {good}" if good else "; no checkpoint covers it"
    return Outcome(True, prev_seq, f"{prev_seq} entries verified{note}")


async def _verify(args: argparse.Namespace) -> int:
    try:
        checkpoints = load_checkpoints(args.checkpoints)
    except (CheckpointFileError, OSError) as exc:
        print(f"eventctl: {args.checkpoints}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    public_key: str | None = args.public_key
    if public_key is None:
        keys = {cp.public_key for cp in checkpoints}
        if len(keys) > 1:
            print(
                "eventctl: the checkpoints carry several public keys; name the one to trust "
                "with --public-key",
                file=sys.stderr,
            )
            return EXIT_ERROR
        public_key = keys.pop() if keys else None
        if public_key is not None:
            print(
                f"trusting the key the checkpoints carry (key id "
                f"{key_id(unb64(public_key))}): compare it with GET /audit/checkpoints/key"
            )
    if public_key is None:
        print(f"eventctl: {args.checkpoints}: no audit.checkpoint in the file", file=sys.stderr)
        return EXIT_ERROR
    try:
        outcome = await verify_offline(args.database, checkpoints, public_key)
    except SQLAlchemyError as exc:
        print(f"eventctl: database: {type(exc).__name__}", file=sys.stderr)
        return EXIT_ERROR
    if outcome.ok:
        print(f"audit chain OK: {outcome.message} ({len(checkpoints)} checkpoint(s) read)")
        return EXIT_OK
    where = f" at seq {outcome.broken_at}" if outcome.broken_at is not None else ""
    print(f"audit chain BROKEN{where}: {outcome.message}")
    return EXIT_BROKEN


def add_audit_commands(groups: Any) -> None:
    audit = groups.add_parser("audit", help="the audit log")
    commands = audit.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify = commands.add_parser(
        "verify",
        help="verify an audit database offline against published checkpoints",
        description=(
            "Recompute the audit hash chain of a database and check it reaches the head of "
            "every signed audit.checkpoint in a file of JSON lines (CloudEvents as captured "
            "from the bus, or eventctl dlq archive records). Exit 0 intact, 1 broken "
            "(rewritten, reordered or cut short), 2 usage, file or database error."
        ),
    )
    verify.add_argument("--database", required=True, metavar="URL", help="the audit database")
    verify.add_argument("--checkpoints", required=True, type=Path, metavar="FILE")
    verify.add_argument(
        "--public-key",
        metavar="KEY",
        help="the Ed25519 public key to trust (base64url raw, as GET /audit/checkpoints/key "
        "answers); default: the one the checkpoints carry",
    )
    verify.set_defaults(handler=_verify)
