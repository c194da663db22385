"""Cross-service fixtures: stacks of real service processes, on SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tributary.messaging.testing import delete_prefixed
from tributary.messaging.topology import Names
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database
from tributary.testkit.processes import module_of

from .stack import SIGNUP_SERVICES, Stack, queue_names


@contextmanager
def new_stack(
    request: pytest.FixtureRequest,
    kind: str,
    workdir: Path,
    broker_url: str,
    services: tuple[str, ...] = SIGNUP_SERVICES,
) -> Iterator[Stack]:
    """An unstarted stack with fresh databases (one per service); everything removed after."""
    created: list[str] = []
    server = ""
    if kind == "sqlite":
        urls = {n: f"sqlite+aiosqlite:///{workdir / (n + '.db')}" for n in services}
    else:
        found: Found = request.getfixturevalue("postgres")
        server = found.url
        created = [f"e2e_{module_of(n)}_{uuid.uuid4().hex[:8]}" for n in services]
        urls = {
            n: asyncio.run(create_postgres_database(server, db))
            for n, db in zip(services, created, strict=True)
        }
    stack = Stack(broker_url=broker_url, workdir=workdir, database_urls=urls)
    stack.mail.start()
    try:
        yield stack
    finally:
        stack.stop()
        stack.mail.stop()
        queues = queue_names(stack.prefix, services=services)
        asyncio.run(delete_prefixed(broker_url, Names(stack.prefix), queues))
        stack.remove_users()
        for name in created:
            asyncio.run(drop_postgres_database(server, name))


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, rabbitmq: Found) -> Iterator[Stack]:
    """A stack of its own (for tests that break something); call ``stack.start()``."""
    with new_stack(request, getattr(request, "param", "sqlite"), tmp_path, rabbitmq.url) as s:
        yield s


@pytest.fixture(scope="module")
def shared_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found
) -> Iterator[Stack]:
    """A started SQLite stack shared by a module's tests: they use unique users, so they
    cannot see each other's data (and start-up, four processes, is paid once)."""
    workdir = tmp_path_factory.mktemp("stack")
    with new_stack(request, "sqlite", workdir, rabbitmq.url) as s:
        s.start()
        yield s
