from __future__ import annotations

from pathlib import Path

from tributary.messaging.testing import (
    OutcomeRecorder,
    delete_prefixed,
    isolated_settings,
    publish_raw,
)
from tributary.onboarding.app import create_app
from tributary.onboarding.settings import Settings
from tributary.service.testing import minter, running
from tributary.testkit.infra import Found

from .test_handlers import user_created


async def test_a_published_sign_up_shows_up_as_a_workspace(tmp_path: Path, rabbitmq: Found) -> None:
    messaging = isolated_settings(rabbitmq.url)
    app = create_app(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'onboarding.db'}", port=0),
        messaging,
    )
    recorder = OutcomeRecorder()
    try:
        async with running(app) as client:
            app.state.bus.listeners.append(recorder)
            assert (await client.get("/health/ready")).json()["status"] == "ready"
            event = user_created("usr_api0000001")
            await publish_raw(
                rabbitmq.url, app.state.bus.names, "user.created.v2", event.to_bytes()
            )
            await recorder.wait_until_handled(event.id)
            found = (await client.get("/workspaces", params={"owner_id": "usr_api0000001"})).json()
            assert [w["owner_id"] for w in found] == ["usr_api0000001"]
            assert (await client.get(f"/workspaces/{found[0]['id']}")).status_code == 200
            assert (await client.get("/workspaces/ws_nope")).status_code == 404
            # without owner_id: the caller's own (the test admin has none)
            assert (await client.get("/workspaces")).json() == []
            tokens = minter(app)
            owner = tokens.member("usr_api0000001")
            mine = await client.get(f"/workspaces/{found[0]['id']}", headers=owner)
            assert mine.status_code == 200
            other = tokens.member("usr_api0000002")
            assert (
                await client.get(f"/workspaces/{found[0]['id']}", headers=other)
            ).status_code == 404
            refused = await client.get(
                "/workspaces", params={"owner_id": "usr_api0000001"}, headers=other
            )
            assert refused.status_code == 403
    finally:
        names = app.state.bus.names
        qs = names.service_queues("onboarding", len(messaging.retry_tiers))
        await delete_prefixed(rabbitmq.url, names, [qs.work, qs.dlq, *qs.retries])
