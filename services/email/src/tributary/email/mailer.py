"""The SMTP client: one connection per email, failures sorted into transient and permanent.

Permanent means *this message* can never be delivered as it is: a 5xx reply to its recipient
or to its content (``RCPT``/``DATA``), or an address that cannot be put on the wire. A 5xx
reply to the session itself (greeting, ``EHLO``, ``MAIL FROM``, ``AUTH``) says the server or
our configuration is wrong, not the message: it is retried like a 4xx, a timeout or a refused
connection, and ends in the DLQ (to be replayed once fixed) rather than writing mail off.
"""

from __future__ import annotations

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


class Mailer:
    """Sends through the SMTP server in the settings; raises :class:`SmtpError` subclasses."""

    def __init__(self, host: str, port: int, *, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    async def send(self, message: EmailMessage) -> None:
        try:
            # flattened here, not by aiosmtplib (policy.SMTP folds at 78 and turns a long URL
            # in List-Unsubscribe into RFC 2047 encoded-words no mail client reads as a URL)
            raw = message.as_bytes(policy=WIRE)
            sender = getaddresses([str(message["From"])])[0][1]
            recipients = [address for _, address in getaddresses([str(message["To"])])]
            await aiosmtplib.send(
                raw,
                sender=sender,
                recipients=recipients,
                hostname=self.host,
                port=self.port,
                timeout=self.timeout,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            raise classify(exc) from exc
