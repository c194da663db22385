from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import col, select

from tributary.email.models import EmailPublic, EmailRecord
from tributary.service.app import SessionDep
from tributary.service.auth import require
from tributary.service.problems import not_found

router = APIRouter(tags=["emails"])


@router.get("/emails", response_model=list[EmailPublic], dependencies=[require("emails:read")])
async def list_emails(
    session: SessionDep,
    to: Annotated[str, Query(min_length=3, max_length=254, description="exact address")],
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[EmailRecord]:
    """The emails sent (or given up) to one address, newest first."""
    rows = await session.exec(
        select(EmailRecord)
        .where(col(EmailRecord.to) == to)
        .order_by(col(EmailRecord.created_at).desc())
        .limit(limit)
    )
    return list(rows.all())


@router.get("/emails/{email_id}", response_model=EmailPublic, dependencies=[require("emails:read")])
async def get_email(session: SessionDep, email_id: str) -> EmailRecord:
    """One email by its id (``eml_…``): status, Message-ID, and the error if it failed."""
    email = await session.get(EmailRecord, email_id)
    if email is None:
        raise not_found(
            f"There is no email {email_id}.", field="path.email_id", message="no such email"
        )
    return email
