"""Databases for the provider (SQLite and PostgreSQL) and a webhook receiver that verifies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tributary.payment_provider.testing import WebhookReceiver, served
from tributary.testkit.infra import fresh_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: an SQLite file or a new PostgreSQL database."""
    async with fresh_database(request, request.param, tmp_path, "provider") as url:
        yield url


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    found = WebhookReceiver()
    async with served(found.app()) as url:
        found.url = f"{url}/hooks"
        yield found


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'provider.db'}"
