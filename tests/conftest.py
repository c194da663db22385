"""Cross-service fixtures: a stack of real service processes per test, on SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tributary.messaging.testing import delete_prefixed
from tributary.messaging.topology import Names
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

from .stack import SIGNUP_SERVICES, Stack, queue_names


def _databases(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        return {n: f"sqlite+aiosqlite:///{tmp_path / (n + '.db')}" for n in SIGNUP_SERVICES}, []
    server: Found = request.getfixturevalue("postgres")
    names = {n: f"e2e_{n}_{uuid.uuid4().hex[:8]}" for n in SIGNUP_SERVICES}
    urls = {n: asyncio.run(create_postgres_database(server.url, db)) for n, db in names.items()}
    return urls, [server.url, *names.values()]


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, rabbitmq: Found) -> Iterator[Stack]:
    """Unstarted: a test may add an OTLP receiver or env first, then call ``stack.start()``."""
    urls, created = _databases(request, tmp_path)
    stack = Stack(broker_url=rabbitmq.url, workdir=tmp_path, database_urls=urls)
    stack.mail.start()
    try:
        yield stack
    finally:
        stack.stop()
        stack.mail.stop()
        asyncio.run(delete_prefixed(rabbitmq.url, Names(stack.prefix), queue_names(stack.prefix)))
        if created:
            server, *names = created
            for name in names:
                asyncio.run(drop_postgres_database(server, name))
