"""The SMTP client: a small pool of open connections, failures sorted into transient and
permanent.

Permanent means *this message* can never be delivered as it is: a 5xx reply to its recipient
or to its content (``RCPT``/``DATA``), or an address that cannot be put on the wire. A 5xx
reply to the session itself (greeting, ``EHLO``, ``MAIL FROM``, ``AUTH``) says the server or
our configuration is wrong, not the message: it is retried like a 4xx, a timeout or a refused
connection, and ends in the DLQ (to be replayed once fixed) rather than writing mail off.
"""

from __future__ import annotations

import asyncio
import email.policy
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Protocol

import aiosmtplib

from tributary.contracts.pii import scrub_text


class SmtpError(Exception):
    """An SMTP failure; ``reason`` is safe to log and to publish (addresses masked)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        self.reason = scrub_text(reason)[:500]
        self.code = code
        super().__init__(self.reason)


class TransientSmtpError(SmtpError):
    """Worth trying again later: 4xx, timeouts, refused or dropped connections."""


class PermanentSmtpError(SmtpError):
    """The message will never be accepted as it is (5xx to its recipient or content)."""


class Sender(Protocol):
    async def send(self, message: EmailMessage) -> None: ...


def _reply(code: int, message: str) -> str:
    return f"{code} {message}".strip()


def classify(exc: Exception) -> SmtpError:
    """The transient or permanent error an aiosmtplib (or socket) exception stands for."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        reason = "; ".join(_reply(r.code, r.message) for r in exc.recipients)
        if codes and all(500 <= c < 600 for c in codes):
            return PermanentSmtpError(reason, max(codes))
        return TransientSmtpError(reason, min(codes) if codes else None)
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused | aiosmtplib.SMTPDataError):
        if 500 <= exc.code < 600:
            return PermanentSmtpError(_reply(exc.code, exc.message), exc.code)
        return TransientSmtpError(_reply(exc.code, exc.message), exc.code)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return TransientSmtpError(_reply(exc.code, exc.message), exc.code)
    if isinstance(exc, ValueError):  # an address aiosmtplib cannot encode
        return PermanentSmtpError(f"unsendable message: {exc}")
    return TransientSmtpError(f"{type(exc).__name__}: {exc}")


WIRE = email.policy.SMTP.clone(max_line_length=998)
"""CRLF, folded only past RFC 5322's 998-character line limit: header values stay as written."""


def envelope(message: EmailMessage) -> tuple[bytes, str, list[str]]:
    """The message as it goes on the wire, its envelope sender and its recipients."""
    # flattened here, not by aiosmtplib (policy.SMTP folds at 78 and turns a long URL in
    # List-Unsubscribe into RFC 2047 encoded-words no mail client reads as a URL)
    raw = message.as_bytes(policy=WIRE)
    sender = getaddresses([str(message["From"])])[0][1]
    recipients = [address for _, address in getaddresses([str(message["To"])])]
    return raw, sender, recipients


def _reusable(exc: Exception, client: aiosmtplib.SMTP) -> bool:
    """Whether a connection that refused one message may carry the next: the server answered
    (aiosmtplib reset the envelope) and did not say it is closing (421)."""
    if not client.is_connected:
        return False
    if isinstance(exc, ValueError):  # refused before anything was sent
        return True
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code != 421 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code != 421


class Mailer:
    """Sends through the SMTP server in the settings over a small pool of open connections;
    raises :class:`SmtpError` subclasses.

    At most ``connections`` connections, opened when first needed and kept open: each carries
    one message at a time, many in turn (``sendmail`` starts a new envelope on the open
    connection; a refused message's envelope is reset with ``RSET``). A connection that timed
    out, dropped, or got a 421 is closed and forgotten, the message's error classified as
    ever; the next send opens a new one. ``max_messages`` (0: no limit) retires a connection
    after that many messages, for servers that limit them. ``close`` quits them all.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        connections: int = 4,
        max_messages: int = 0,
    ) -> None:
        if connections < 1:
            raise ValueError("a mailer needs at least one connection")
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_messages = max_messages
        self.opened = 0
        """Connections opened so far (a connection carries many messages)."""
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[aiosmtplib.SMTP] = []
        self._carried: dict[int, int] = {}
        self._closed = False

    async def send(self, message: EmailMessage) -> None:
        try:
            raw, sender, recipients = envelope(message)
        except ValueError as exc:
            raise classify(exc) from exc
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise TransientSmtpError(f"no SMTP connection free within {self.timeout:g} s") from None
        client: aiosmtplib.SMTP | None = None
        keep = False
        try:
            client = await self._client()
            await client.sendmail(sender, recipients, raw)
            keep = True
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            keep = client is not None and _reusable(exc, client)
            raise classify(exc) from exc
        finally:
            if client is not None:
                self._put_back(client, keep)
            self._slots.release()

    async def _client(self) -> aiosmtplib.SMTP:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:  # the server may have closed it while it was idle
                return client
            self._forget(client)
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout)
        await client.connect()
        self.opened += 1
        self._carried[id(client)] = 0
        return client

    def _put_back(self, client: aiosmtplib.SMTP, keep: bool) -> None:
        carried = self._carried.get(id(client), 0) + 1
        self._carried[id(client)] = carried
        spent = self.max_messages > 0 and carried >= self.max_messages
        if keep and not spent and not self._closed and client.is_connected:
            self._idle.append(client)
        elif keep and client.is_connected:  # in good order: say goodbye
            self._forget(client)
            task = asyncio.get_running_loop().create_task(_quit(client, self.timeout))
            _QUITTING.add(task)
            task.add_done_callback(_QUITTING.discard)
        else:  # in an unknown state (timeout, drop, 421, cancelled): just close the socket
            self._forget(client)
            client.close()

    def _forget(self, client: aiosmtplib.SMTP) -> None:
        self._carried.pop(id(client), None)

    async def close(self) -> None:
        """Quit every idle connection (the consumers have stopped: none is in use). A send
        after this opens a new one."""
        self._closed = True
        try:
            idle, self._idle = self._idle, []
            for client in idle:
                self._forget(client)
            await asyncio.gather(*(_quit(c, self.timeout) for c in idle))
            await asyncio.gather(*list(_QUITTING), return_exceptions=True)
        finally:
            self._closed = False


_QUITTING: set[asyncio.Task[None]] = set()


async def _quit(client: aiosmtplib.SMTP, timeout: float) -> None:
    try:
        await client.quit(timeout=timeout)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()
