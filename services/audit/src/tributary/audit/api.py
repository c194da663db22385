from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Query, Request
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, select

from tributary.audit import chain
from tributary.audit.checkpoints import Signer
from tributary.audit.models import (
    AuditCheckpoint,
    AuditEntry,
    AuditPage,
    CheckpointPage,
    CheckpointRef,
    SigningKey,
    Verification,
)
from tributary.contracts.catalog import NAMESPACE, CatalogError, catalog
from tributary.messaging.db import as_utc
from tributary.service.app import SessionDep
from tributary.service.auth import public, require
from tributary.service.problems import invalid

router = APIRouter(tags=["audit"])

_VERSIONED = re.compile(r"^.+\.v\d+$")
_CURSOR = re.compile(r"^seq:(\d{1,19})$")
MAX_SEQ = 2**63 - 1


def _invalid(field: str, message: str) -> NoReturn:
    """A 422 problem naming the query parameter, like the validation of the others."""
    raise invalid(f"query.{field}", message)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if (match := _CURSOR.fullmatch(raw)) is None or int(match.group(1)) > MAX_SEQ:
        _invalid("cursor", "not a cursor returned by this API (use the 'next' of a page)")
    return int(match.group(1))


def _type_filter(value: str) -> ColumnElement[bool]:
    """A CloudEvents type or routing key matches that version; a bare type name, every one."""
    if value.startswith(NAMESPACE + "."):
        return col(AuditEntry.type) == value
    if _VERSIONED.fullmatch(value):
        return col(AuditEntry.type) == f"{NAMESPACE}.{value}"
    try:
        spec = catalog().type(value)
    except CatalogError:
        _invalid(
            "type",
            "is neither a CloudEvents type, a routing key (user.created.v1) "
            "nor an event type of the catalog",
        )
    return col(AuditEntry.type).in_([v.ce_type for v in spec.versions.values()])


@router.get("/audit", response_model=AuditPage, dependencies=[require("audit:read")])
async def list_entries(
    session: SessionDep,
    type: Annotated[
        str | None,
        Query(
            max_length=200,
            description="`com.tributary.user.created.v1`, `user.created.v1`, or `user.created` "
            "(every version)",
        ),
    ] = None,
    subject: Annotated[str | None, Query(max_length=500)] = None,
    correlation_id: Annotated[str | None, Query(max_length=200)] = None,
    from_: Annotated[
        datetime | None,
        Query(alias="from", description="Event time at or after (ISO-8601; no offset = UTC)"),
    ] = None,
    to: Annotated[
        datetime | None,
        Query(description="Event time before (ISO-8601; no offset = UTC)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
    after_seq: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
) -> dict[str, Any]:
    """Recorded events in the order they were recorded, PII masked, filtered and paginated.

    Pass the page's `next` as `cursor` to read on; `after_seq` does the same by number.
    """
    if cursor is not None and after_seq is not None:
        _invalid("cursor", "give either cursor or after_seq, not both")
    after = decode_cursor(cursor) if cursor is not None else after_seq or 0
    query = select(AuditEntry).where(col(AuditEntry.seq) > after)
    if type is not None:
        query = query.where(_type_filter(type))
    if subject is not None:
        query = query.where(col(AuditEntry.subject) == subject)
    if correlation_id is not None:
        query = query.where(col(AuditEntry.correlation_id) == correlation_id)
    if from_ is not None:
        query = query.where(col(AuditEntry.event_time) >= as_utc(from_))
    if to is not None:
        if from_ is not None and as_utc(from_) > as_utc(to):
            _invalid("from", "'from' is later than 'to'")
        query = query.where(col(AuditEntry.event_time) < as_utc(to))
    rows = list((await session.exec(query.order_by(col(AuditEntry.seq)).limit(limit + 1))).all())
    more = len(rows) > limit
    entries = rows[:limit]
    return {
        "entries": entries,
        "next": encode_cursor(entries[-1].seq) if more else None,
    }


@router.get(
    "/audit/verify",
    response_model=Verification,
    response_model_exclude_none=True,
    dependencies=[require("audit:verify")],
)
async def verify_chain(
    request: Request,
    session: SessionDep,
    full: Annotated[
        bool, Query(description="Recompute from the first entry, not the last verified checkpoint")
    ] = False,
) -> Verification:
    """Recompute the hash chain and check it reaches the head of every signed checkpoint.

    Names the first entry that breaks it: a bad link, a rewrite (even with every later hash
    recomputed: a checkpoint's head no longer matches), a reorder, or a truncation behind a
    checkpoint. Starts from the last checkpoint an earlier call verified unless `full`.
    """
    signer: Signer = request.app.state.signer
    known: CheckpointRef | None = request.app.state.verified
    result = await chain.verify(session, public_key=signer.public_key, known=known, full=full)
    if result.ok and result.checkpoint is not None:
        request.app.state.verified = result.checkpoint
    return result


@router.get(
    "/audit/checkpoints", response_model=CheckpointPage, dependencies=[require("audit:read")]
)
async def list_checkpoints(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before_seq: Annotated[int | None, Query(ge=1, le=MAX_SEQ)] = None,
) -> dict[str, Any]:
    """Signed checkpoints, newest first (`before_seq` reads on)."""
    query = select(AuditCheckpoint)
    if before_seq is not None:
        query = query.where(col(AuditCheckpoint.seq) < before_seq)
    rows = (await session.exec(query.order_by(col(AuditCheckpoint.seq).desc()).limit(limit))).all()
    return {"checkpoints": list(rows)}


@router.get("/audit/checkpoints/key", response_model=SigningKey, dependencies=[public()])
async def checkpoint_key(request: Request) -> SigningKey:
    """The public key checkpoints are signed with (public: verifiers need it; compare it with
    a copy obtained out of band before trusting it)."""
    signer: Signer = request.app.state.signer
    return SigningKey(key_id=signer.key_id, public_key=signer.public_key)
