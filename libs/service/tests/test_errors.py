"""A route that fails because the database is down answers 503 with Retry-After, not a 500."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import APIRouter

from tributary.messaging.testing import isolated_settings
from tributary.service.app import ServiceSpec, create_app
from tributary.service.settings import ServiceSettings
from tributary.service.testing import running
from tributary.testkit.infra import Found

pytestmark = pytest.mark.broker


async def test_a_database_outage_is_a_503_to_retry(
    tmp_path: Path, rabbitmq: Found, caplog: pytest.LogCaptureFixture
) -> None:
    router = APIRouter()

    @router.get("/outage")
    async def outage() -> None:
        # what asyncpg raises when the pool cannot reach the server
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")

    app = create_app(
        ServiceSpec(
            name="errors",
            settings=ServiceSettings(
                database_url=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", port=0
            ),
            migrations=None,
            routers=[router],
            messaging=isolated_settings(rabbitmq.url),
        )
    )
    async with running(app) as client:
        down = await client.get("/outage")
        assert down.status_code == 503
        assert down.headers["retry-after"] == "5"
        assert "unavailable" in down.json()["detail"]
        assert not [r for r in caplog.records if r.exc_info and r.name == "tributary.service"]
