"""The notification app served by real uvicorn; streams read with tributary.testkit.sse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from tributary.messaging.testing import OutcomeRecorder, isolated_settings
from tributary.messaging.topology import Names
from tributary.notification.app import create_app
from tributary.notification.server import StreamClosingServer, server_for
from tributary.service.auth import Verifier
from tributary.service.testing import TokenMinter
from tributary.testkit.processes import free_port
from tributary.testkit.sse import SseReader
from tributary.testkit.waiting import eventually

from .service import NotificationService, probed, settings_for


@dataclass
class Served(NotificationService):
    server: StreamClosingServer | None = None
    task: asyncio.Task[None] | None = None
    url: str = ""

    @asynccontextmanager
    async def stream(self, user_id: str, **kwargs: Any) -> AsyncIterator[SseReader]:
        """The user's stream, opened as the user (``headers`` and ``params`` as httpx's)."""
        headers = {**self.tokens.member(user_id), **kwargs.pop("headers", {})}
        async with self.client.stream(
            "GET", f"/users/{user_id}/notifications/stream", headers=headers, **kwargs
        ) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield SseReader(response)

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await self.task


@asynccontextmanager
async def served(
    database_url: str, broker_url: str, *, graceful: float = 30, **settings: Any
) -> AsyncIterator[Served]:
    """The app behind real uvicorn (the server ``python -m tributary.notification`` runs),
    trusting a test token minter; stopped, and its queues deleted, after."""
    messaging = isolated_settings(broker_url)
    app = create_app(settings_for(database_url, **settings), messaging)
    port = free_port()
    server = server_for(
        app, "127.0.0.1", port, log_level="warning", timeout_graceful_shutdown=graceful
    )
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        assert not task.done(), "the server died"
        return server.started

    await eventually(started, timeout=30, what="uvicorn to listen")
    tokens = TokenMinter()
    app.state.test_tokens = tokens
    app.state.auth = Verifier(tokens, tokens.settings)
    recorder = OutcomeRecorder()
    app.state.bus.listeners.append(recorder)
    url = f"http://127.0.0.1:{port}"
    try:
        async with (
            probed(app, broker_url) as probe,
            httpx.AsyncClient(base_url=url, headers=tokens.headers(), timeout=10) as client,
        ):
            service = Served(
                app,
                client,
                recorder,
                Names(messaging.name_prefix),
                broker_url,
                probe,
                server=server,
                task=task,
                url=url,
            )
            try:
                yield service
            finally:
                await service.stop()
    finally:
        if not task.done():
            server.should_exit = True
            await task
