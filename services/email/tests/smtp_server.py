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
    """An aiosmtpd handler: refuses ``refuse`` with 550, defers the first ``defer`` with 451,
    answers the ``closing``-th recipients (by attempt number) with 421."""

    def __init__(
        self,
        *,
        refuse: frozenset[str] = frozenset(),
        defer: int = 0,
        closing: frozenset[int] = frozenset(),
    ) -> None:
        self.refuse = refuse
        self.defer = defer
        self.closing = closing
        self.rcpt_attempts = 0
        self.messages: list[EmailMessage] = []
        self.raw: list[bytes] = []
        """Each message as it arrived on the wire."""
        self.peers: list[tuple[str, int]] = []
        """The client address and port each message came from: one per connection."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        self.rcpt_attempts += 1
        if self.rcpt_attempts in self.closing:
            return "421 4.3.2 closing this connection"
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        if self.rcpt_attempts <= self.defer:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.raw.append(envelope.content)
        self.peers.append(tuple(session.peer))
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 2.0.0 accepted"

    @property
    def connections(self) -> int:
        """How many connections carried the messages accepted."""
        return len(set(self.peers))

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
