"""``python -m tributary.<service>``: serve the app with uvicorn."""

from __future__ import annotations

import logging
import os

import uvicorn
from fastapi import FastAPI

from tributary.service.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
