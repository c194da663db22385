"""A Server-Sent Events reader over an httpx streaming response (``text/event-stream``)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Message:
    """One SSE block: an event (``event``, ``id``, ``data``) or only comments/``retry``."""

    event: str | None = None
    id: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


class SseReader:
    """Parses ``text/event-stream`` lines as they arrive."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 10.0) -> Message:
        """The next block; TimeoutError if none is complete within ``timeout``."""
        async with asyncio.timeout(timeout):
            message = Message()
            data: list[str] = []
            async for line in self._lines:
                if line == "":
                    if data:
                        message.data = "\n".join(data)
                    return message
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    message.comments.append(value)
                elif name == "event":
                    message.event = value
                elif name == "id":
                    message.id = value
                elif name == "data":
                    data.append(value)
                elif name == "retry":
                    message.retry = int(value)
            raise EOFError("the stream ended")

    async def next_event(self, timeout: float = 10.0) -> Message:
        """The next block that is an event (comments skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.next(timeout)
                if message.event is not None:
                    return message

    async def rest(self, timeout: float = 10.0) -> list[Message]:
        """Every block until the stream ends."""
        found: list[Message] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    found.append(await self.next(timeout))
                except EOFError:
                    return found
