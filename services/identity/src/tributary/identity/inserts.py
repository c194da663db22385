"""Inserts that tolerate a concurrent twin: two replicas starting at once make one row."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession


async def insert_or_ignore(session: AsyncSession, model: type[SQLModel], **values: Any) -> None:
    """``INSERT … ON CONFLICT DO NOTHING``: a row that would break a unique constraint is left
    out instead of failing the transaction. Read back by the key chosen to know which won."""
    table = SQLModel.metadata.tables[str(model.__tablename__)]
    dialect = sqlite if session.get_bind().dialect.name == "sqlite" else postgresql
    await session.exec(dialect.insert(table).values(**values).on_conflict_do_nothing())
