"""``X-Correlation-ID``: accepted when valid, generated otherwise, echoed on the response."""

from __future__ import annotations

import re

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tributary.messaging import context
from tributary.observability.tracing import CORRELATION_ID

HEADER = "x-correlation-id"
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def accept(value: str | None) -> str:
    """The caller's id if it is 1 to 64 characters of ``A-Z a-z 0-9 . _ : -``, else a new one."""
    if value and _VALID.fullmatch(value):
        return value
    return context.new_correlation_id()


class CorrelationMiddleware:
    """Pure ASGI, so the id is in the request's context for the endpoint and its outbox rows."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(HEADER.encode())
        cid = accept(raw.decode("latin-1") if raw else None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"].append((HEADER.encode(), cid.encode()))
            await send(message)

        # the server span began before the id was known: give it the id too
        trace.get_current_span().set_attribute(CORRELATION_ID, cid)
        with context.correlated(cid):
            await self.app(scope, receive, send_with_id)
