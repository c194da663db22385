"""``python -m tributary.<service>``: serve the app with uvicorn."""

from __future__ import annotations

import os

import uvicorn
from fastapi import FastAPI

from tributary.observability.logs import setup_logging
from tributary.service.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    setup_logging(app.title.removeprefix("Tributary "), os.environ.get("LOG_LEVEL", "INFO"))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
