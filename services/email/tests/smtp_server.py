"""A real SMTP server for tests (aiosmtpd, in its own thread) that keeps what it accepts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


class Mailbox:
    """An aiosmtpd handler: refuses ``refuse`` with 550, defers the first ``defer`` with 451."""

    def __init__(self, *, refuse: frozenset[str] = frozenset(), defer: int = 0) -> None:
        self.refuse = refuse
        self.defer = defer
        self.rcpt_attempts = 0
        self.messages: list[EmailMessage] = []
        self.raw: list[bytes] = []
        """Each message as it arrived on the wire."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        self.rcpt_attempts += 1
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        if self.rcpt_attempts <= self.defer:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.raw.append(envelope.content)
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 2.0.0 accepted"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def smtp_server(mailbox: Mailbox, port: int | None = None) -> AsyncIterator[int]:
    """Serve ``mailbox`` on 127.0.0.1 (a free port unless given); yields the port."""
    port = port or free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        yield port
    finally:
        await asyncio.to_thread(controller.stop)
