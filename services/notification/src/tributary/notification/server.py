"""Serving the notification service: uvicorn, with the live streams ended first on shutdown.

uvicorn waits (up to its graceful timeout) for open responses to finish before it runs the
app's lifespan shutdown, and a live stream never finishes by itself: without this, every
restart would hold for the whole timeout and then cut the streams off. This server ends them
cleanly (a ``: closing`` comment, then the end of the response) as soon as shutdown begins;
clients reconnect, to another replica or to the restarted one, with ``Last-Event-ID``.
"""

from __future__ import annotations

import os
import socket

import uvicorn
from fastapi import FastAPI

from tributary.notification.streams import Streams
from tributary.observability.logs import setup_logging


class StreamClosingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, streams: Streams) -> None:
        super().__init__(config)
        self.streams = streams

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.streams.close()
        await super().shutdown(sockets)


def server_for(app: FastAPI, host: str, port: int, **options: object) -> StreamClosingServer:
    config = uvicorn.Config(app, host=host, port=port, **options)  # type: ignore[arg-type]
    return StreamClosingServer(config, app.state.streams)


def serve(app: FastAPI, host: str, port: int) -> None:
    """As ``tributary.service.runner.serve`` does for the other services."""
    setup_logging(app.title.removeprefix("Tributary "), os.environ.get("LOG_LEVEL", "INFO"))
    server_for(
        app, host, port, log_config=None, access_log=False, timeout_graceful_shutdown=10
    ).run()
