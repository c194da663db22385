"""create_app's error answers: a database outage is a 503 to retry, a bug a 500; problem details."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import APIRouter

from tributary.messaging.testing import isolated_settings
from tributary.service.app import ServiceSpec, create_app
from tributary.service.problems import MEDIA_TYPE, TYPE_BASE
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

    @router.get("/bug")
    async def bug() -> None:
        raise KeyError("ada@example.com")

    @router.post("/echo")
    async def echo(body: dict[str, str]) -> dict[str, str]:
        return body

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
        assert down.headers["content-type"] == MEDIA_TYPE
        assert down.json()["type"] == TYPE_BASE + "service-unavailable"
        assert "unavailable" in down.json()["detail"]
        assert not [r for r in caplog.records if r.exc_info and r.name.startswith("tributary")]

        broken = await client.get("/bug", headers={"X-Correlation-ID": "bug-1"})
        assert broken.status_code == 500
        assert broken.headers["content-type"] == MEDIA_TYPE
        assert broken.headers["x-correlation-id"] == "bug-1"
        assert "ada@example.com" not in broken.text
        assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [KeyError]

        too_big = await client.post("/echo", json={"text": "x" * 70_000})
        invalid = await client.post("/echo", json={"text": 1})
        assert too_big.status_code == 413  # the default limit is 64 KiB
        assert invalid.status_code == 422
        assert invalid.json()["errors"][0]["field"] == "body.text"
        assert (await client.get("/nowhere")).headers["content-type"] == MEDIA_TYPE
