"""A fresh PostgreSQL database per test that asks for one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database


@pytest.fixture
async def postgres_url(postgres: Found) -> AsyncIterator[str]:
    name = f"t_audit_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(postgres.url, name)
    try:
        yield url
    finally:
        await drop_postgres_database(postgres.url, name)
