from __future__ import annotations

import asyncio
import contextlib
from email.message import EmailMessage
from typing import cast

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tributary.email.mailer import (
    Mailer,
    PermanentSmtpError,
    SmtpError,
    TransientSmtpError,
    _reusable,
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


def note(n: int, to: str = "ada@example.com") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "no-reply@tributary.dev"
    message["To"] = to
    message["Message-ID"] = f"<{n}@tributary.dev>"
    message.set_content(f"message {n}")
    return message


async def test_the_pool_carries_many_messages_over_few_connections() -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        mailer = Mailer("127.0.0.1", port, timeout=5, connections=3)
        await asyncio.gather(*(mailer.send(note(n)) for n in range(60)))
        await mailer.close()

    assert len(mailbox.messages) == 60
    assert sorted(str(m["Message-ID"]) for m in mailbox.messages) == sorted(
        f"<{n}@tributary.dev>" for n in range(60)
    )
    assert mailbox.connections <= 3
    assert mailer.opened == mailbox.connections


async def test_a_connection_retires_after_its_message_limit() -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        mailer = Mailer("127.0.0.1", port, timeout=5, connections=1, max_messages=4)
        for n in range(10):
            await mailer.send(note(n))
        await mailer.close()

    assert mailbox.connections == mailer.opened == 3  # 4 + 4 + 2


async def test_a_dropped_connection_is_replaced() -> None:
    mailbox = Mailbox()
    port = free_port()
    async with smtp_server(mailbox, port):
        mailer = Mailer("127.0.0.1", port, timeout=5, connections=1)
        await mailer.send(note(1))
    async with smtp_server(mailbox, port):  # the server restarted: the pooled socket is dead
        failures = 0
        for _ in range(2):  # a drop noticed only when the next send uses it is transient
            try:
                await mailer.send(note(2))
                break
            except TransientSmtpError:
                failures += 1
        assert failures <= 1
        await mailer.send(note(3))
        await mailer.close()

    assert [str(m["Message-ID"]) for m in mailbox.messages] == [
        "<1@tributary.dev>",
        "<2@tributary.dev>",
        "<3@tributary.dev>",
    ]
    assert mailer.opened == 2
    assert mailbox.connections == 2


async def test_a_421_discards_the_connection_and_a_550_keeps_it() -> None:
    mailbox = Mailbox(closing=frozenset({2}), refuse=frozenset({"nobody@example.com"}))
    async with smtp_server(mailbox) as port:
        mailer = Mailer("127.0.0.1", port, timeout=5, connections=1)
        await mailer.send(note(1))
        with pytest.raises(TransientSmtpError) as closing:
            await mailer.send(note(2))
        assert closing.value.code == 421
        with pytest.raises(PermanentSmtpError):
            await mailer.send(note(3, to="nobody@example.com"))
        await mailer.send(note(4))
        await mailer.close()

    assert [str(m["Message-ID"]) for m in mailbox.messages] == [
        "<1@tributary.dev>",
        "<4@tributary.dev>",
    ]
    assert mailer.opened == 2  # one before the 421, one after it (kept through the 550)


async def test_a_send_cancelled_mid_conversation_leaves_no_broken_connection_in_the_pool() -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        mailer = Mailer("127.0.0.1", port, timeout=5, connections=1)
        await mailer.send(note(1))
        sending = asyncio.create_task(mailer.send(note(2)))
        await asyncio.sleep(0)  # it has the connection and is mid-way through the envelope
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        await mailer.send(note(3))
        await mailer.close()

    sent = [str(m["Message-ID"]) for m in mailbox.messages]
    assert sent[0] == "<1@tributary.dev>"
    assert sent[-1] == "<3@tributary.dev>"


class _Connected:
    is_connected = True


@given(st.lists(st.integers(min_value=400, max_value=599), min_size=1, max_size=5))
def test_any_refusal_keeps_the_connection_unless_the_server_says_it_is_closing(
    codes: list[int],
) -> None:
    refusal = aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(c, "no", f"r{i}@example.com") for i, c in enumerate(codes)]
    )
    error = classify(refusal)
    assert isinstance(error, PermanentSmtpError) == all(c >= 500 for c in codes)
    assert _reusable(refusal, cast(aiosmtplib.SMTP, _Connected())) == (421 not in codes)
    data = aiosmtplib.SMTPDataError(codes[0], "no")
    assert _reusable(data, cast(aiosmtplib.SMTP, _Connected())) == (codes[0] != 421)
