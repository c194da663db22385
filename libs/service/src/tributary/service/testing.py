"""Test support for services: run an app's lifespan in-process, fake outboxes for handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.events import Payload
from tributary.contracts.validation import validate
from tributary.messaging.db import create_engine, session_factory


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Start the app's lifespan (migrations, bus, consumers) and give a client to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@dataclass
class FakeOutbox:
    """Collects what a handler emits; validates it strictly like the real one."""

    events: list[tuple[Payload, dict[str, Any]]] = field(default_factory=list)
    added: int = 0

    def add(self, payload: Payload, **kwargs: Any) -> None:
        validate(payload.routing_key, payload.model_dump(mode="json", exclude_none=True))
        self.events.append((payload, kwargs))
        self.added += 1


@dataclass
class FakeUnitOfWork:
    """A real session on a throw-away SQLite database and a fake outbox."""

    session: AsyncSession
    outbox: FakeOutbox = field(default_factory=FakeOutbox)
    is_replay: bool = False
    suppress_side_effects: bool = False


@asynccontextmanager
async def fake_uow(path: str) -> AsyncIterator[FakeUnitOfWork]:
    """``path``: an SQLite file; every SQLModel table is created in it."""
    engine: AsyncEngine = create_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)
    async with session_factory(engine)() as session:
        yield FakeUnitOfWork(session)
        await session.commit()
    await engine.dispose()
