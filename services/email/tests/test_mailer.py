from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib
import pytest

from tributary.email.mailer import (
    Mailer,
    PermanentSmtpError,
    SmtpError,
    TransientSmtpError,
    classify,
)

from .smtp_server import Mailbox, free_port, smtp_server


def refused(code: int) -> aiosmtplib.SMTPRecipientsRefused:
    return aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(code, "mailbox unavailable", "ada@example.com")]
    )


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (refused(550), PermanentSmtpError, 550),
        (refused(451), TransientSmtpError, 451),
        (
            aiosmtplib.SMTPRecipientRefused(553, "bad address", "ada@example.com"),
            PermanentSmtpError,
            553,
        ),
        (aiosmtplib.SMTPDataError(554, "content rejected"), PermanentSmtpError, 554),
        (aiosmtplib.SMTPDataError(452, "out of storage"), TransientSmtpError, 452),
        (
            aiosmtplib.SMTPSenderRefused(550, "sender denied", "no-reply@tributary.dev"),
            TransientSmtpError,
            550,
        ),
        (aiosmtplib.SMTPHeloError(501, "who are you"), TransientSmtpError, 501),
        (aiosmtplib.SMTPConnectError("connection refused"), TransientSmtpError, None),
        (aiosmtplib.SMTPReadTimeoutError("timed out"), TransientSmtpError, None),
        (aiosmtplib.SMTPServerDisconnected("gone"), TransientSmtpError, None),
        (ConnectionRefusedError(111, "refused"), TransientSmtpError, None),
        (ValueError("address cannot be encoded"), PermanentSmtpError, None),
    ],
)
def test_smtp_failures_are_sorted_into_transient_and_permanent(
    exc: Exception, kind: type[SmtpError], code: int | None
) -> None:
    error = classify(exc)
    assert type(error) is kind
    assert error.code == code


def test_reasons_never_carry_an_address() -> None:
    error = classify(
        aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(550, "<ada@example.com> unknown", "ada@example.com")]
        )
    )
    assert "ada@" not in error.reason
    assert error.reason == "550 <a***@example.com> unknown"


async def test_a_server_that_is_not_listening_is_a_transient_failure() -> None:
    message = EmailMessage()
    message["From"] = "no-reply@tributary.dev"
    message["To"] = "ada@example.com"
    message.set_content("hello")

    with pytest.raises(TransientSmtpError):
        await Mailer("127.0.0.1", free_port(), timeout=5).send(message)


async def test_a_long_list_unsubscribe_url_reaches_the_server_as_written() -> None:
    """aiosmtplib's own flattening (policy.SMTP, 78 columns) turned a long one-click URL into
    RFC 2047 encoded-words; mail clients need the URL itself between angle brackets."""
    url = "https://notify.example.com/unsubscribe?token=u1." + "A" * 120 + ".sig_0123456789"
    message = EmailMessage()
    message["From"] = "Tributary <no-reply@tributary.dev>"
    message["To"] = "ada@example.com"
    message["Subject"] = "Your report is ready"
    message["List-Unsubscribe"] = f"<{url}>"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content("hello")
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        await Mailer("127.0.0.1", port, timeout=5).send(message)

    (raw,) = mailbox.raw
    assert f"\r\nList-Unsubscribe: <{url}>\r\n".encode() in raw
    assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in raw
