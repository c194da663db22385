"""Wait for an outcome, never for a fixed time: poll a check until it holds or time runs out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 30.0, what: str = "", poll: float = 0.1
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(poll)
    return value


async def eventually(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 20.0,
    what: str = "",
    poll: float = 0.05,
) -> None:
    """Await ``check()`` until it holds (for state that sends no notification: databases)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or check}")
        await asyncio.sleep(poll)
