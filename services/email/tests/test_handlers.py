from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
from sqlmodel import select

from tributary.contracts.envelope import new_event
from tributary.contracts.events import (
    EmailFailedV1,
    EmailSendV1,
    EmailSentV1,
    SubscriptionActivatedV1,
    UserCreatedV2,
)
from tributary.email.handlers import (
    Delivery,
    RecipientNotYetKnown,
    on_email_send,
    on_subscription_activated,
    on_user_created,
)
from tributary.email.mailer import PermanentSmtpError, SmtpError, TransientSmtpError
from tributary.email.models import EmailRecord, Recipient, email_id_for, message_id_for
from tributary.messaging.errors import PermanentError
from tributary.service.testing import FakeUnitOfWork, fake_uow

FROM = "Tributary <no-reply@tributary.dev>"


@dataclass
class FakeMailer:
    """Keeps what it was asked to send; fails with ``failure`` while one is set."""

    sent: list[EmailMessage] = field(default_factory=list)
    failure: SmtpError | None = None
    attempts: int = 0

    async def send(self, message: EmailMessage) -> None:
        self.attempts += 1
        if self.failure is not None:
            raise self.failure
        self.sent.append(message)


def user_created(
    user_id: str = "usr_0123456789", email: str = "ada@example.com", locale: str = "en-GB"
) -> Any:
    return new_event(
        routing_key="user.created.v2",
        source="/services/identity",
        data=UserCreatedV2(
            user_id=user_id,
            email=email,
            given_name="Ada",
            family_name="Lovelace",
            plan="free",
            locale=locale,
            created_at=datetime.now(UTC),
        ),
    )


def subscription_activated(user_id: str = "usr_0123456789") -> Any:
    return new_event(
        routing_key="subscription.activated.v1",
        source="/services/identity",
        data=SubscriptionActivatedV1(
            subscription_id="sub_0123456789",
            user_id=user_id,
            plan="pro",
            payment_id="pay_0123456789",
            activated_at=datetime.now(UTC),
        ),
    )


def email_send(to: str = "grace@example.com", **changes: Any) -> Any:
    values: dict[str, Any] = {
        "request_id": uuid.uuid4(),
        "to": to,
        "template": "notification",
        "subject": "Grace mentioned you",
        "variables": {"given_name": "Ada", "text": "Look at this", "url": "https://x.test/d/1"},
    }
    values.update(changes)
    return new_event(
        routing_key="email.send.v1", source="/services/notification", data=EmailSendV1(**values)
    )


async def emails(uow: FakeUnitOfWork) -> list[EmailRecord]:
    return list((await uow.session.exec(select(EmailRecord))).all())


@pytest.fixture
async def uow(tmp_path: Path) -> Any:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        yield uow


@pytest.fixture
def mailer() -> FakeMailer:
    return FakeMailer()


@pytest.fixture
def delivery(mailer: FakeMailer) -> Delivery:
    return Delivery(mailer=mailer, from_address=FROM)


async def test_a_new_user_gets_one_welcome_email_and_it_is_announced(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    await on_user_created(user_created(), cast(Any, uow), delivery)

    [message] = mailer.sent
    assert message["To"] == "ada@example.com"
    assert message["From"] == FROM
    assert message["Message-ID"] == message_id_for("welcome:usr_0123456789")
    assert message["Subject"] == "Welcome to Tributary"
    assert message.get_content().startswith("Hi Ada,\n")
    [record] = await emails(uow)
    assert (record.status, record.template, record.user_id) == ("sent", "welcome", "usr_0123456789")
    assert record.sent_at is not None
    [(payload, meta)] = uow.outbox.events
    assert isinstance(payload, EmailSentV1)
    assert (payload.email_id, payload.message_id) == (record.id, message["Message-ID"])
    assert meta == {"subject": f"emails/{record.id}", "idempotency_key": f"email.sent:{record.id}"}


async def test_the_same_user_announced_again_is_not_mailed_again(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    await on_user_created(user_created(), cast(Any, uow), delivery)
    await uow.session.commit()
    await on_user_created(user_created(), cast(Any, uow), delivery)  # another event id

    assert len(mailer.sent) == 1
    assert len(await emails(uow)) == 1
    assert len(uow.outbox.events) == 1


async def test_a_5xx_reply_records_a_failed_email_and_announces_it(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    mailer.failure = PermanentSmtpError("550 5.1.1 <ada@example.com>: no such user", 550)

    await on_user_created(user_created(), cast(Any, uow), delivery)  # handled: no exception

    [record] = await emails(uow)
    assert record.status == "failed"
    assert record.sent_at is None
    assert record.error == "550 5.1.1 <a***@example.com>: no such user"
    [(payload, _meta)] = uow.outbox.events
    assert isinstance(payload, EmailFailedV1)
    assert (payload.email_id, payload.permanent, payload.reason) == (record.id, True, record.error)


async def test_an_email_that_failed_for_good_is_not_tried_again(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    mailer.failure = PermanentSmtpError("550 no such user", 550)
    await on_user_created(user_created(), cast(Any, uow), delivery)
    await uow.session.commit()
    mailer.failure = None

    await on_user_created(user_created(), cast(Any, uow), delivery)

    assert (mailer.attempts, mailer.sent) == (1, [])
    assert len(uow.outbox.events) == 1


async def test_a_4xx_reply_is_raised_for_a_retry_and_the_retry_sends_once(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    mailer.failure = TransientSmtpError("451 4.3.0 try again later", 451)
    event = user_created()

    with pytest.raises(TransientSmtpError) as raised:
        await on_user_created(event, cast(Any, uow), delivery)
    assert not isinstance(raised.value, PermanentError)  # the runtime retries it
    await uow.session.rollback()  # what the runtime does with a failed transaction
    assert await emails(uow) == []
    assert uow.outbox.events == []

    mailer.failure = None
    await on_user_created(event, cast(Any, uow), delivery)
    assert len(mailer.sent) == 1
    assert [r.status for r in await emails(uow)] == ["sent"]


async def test_a_replayed_delivery_sends_and_records_nothing(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    uow.is_replay = uow.suppress_side_effects = True

    await on_user_created(user_created(), cast(Any, uow), delivery)
    await on_subscription_activated(subscription_activated(), cast(Any, uow), delivery)
    await on_email_send(email_send(), cast(Any, uow), delivery)

    assert mailer.attempts == 0
    assert await emails(uow) == []
    assert uow.outbox.events == []


async def test_subscription_activated_mails_the_known_user_in_their_language(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    await on_user_created(user_created(locale="de-DE"), cast(Any, uow), delivery)
    await uow.session.commit()

    await on_subscription_activated(subscription_activated(), cast(Any, uow), delivery)

    welcome, activated = mailer.sent
    assert activated["To"] == "ada@example.com"
    assert activated["Subject"] == "Ihr Tributary-Tarif pro ist aktiv"
    assert activated["Message-ID"] == message_id_for("subscription_activated:sub_0123456789")
    assert activated["Message-ID"] != welcome["Message-ID"]
    assert activated.get_content().startswith("Hallo Ada,\n")
    assert (welcome["Content-Language"], activated["Content-Language"]) == ("de-DE", "de-DE")
    assert {r.template for r in await emails(uow)} == {"welcome", "subscription_activated"}


async def test_subscription_activated_for_a_user_not_yet_known_is_retried_later(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    with pytest.raises(RecipientNotYetKnown) as raised:
        await on_subscription_activated(subscription_activated(), cast(Any, uow), delivery)

    assert not isinstance(raised.value, PermanentError)
    assert "usr_0123456789" in str(raised.value)
    assert mailer.attempts == 0


async def test_a_user_announced_again_does_not_undo_a_later_address_change(
    uow: FakeUnitOfWork, delivery: Delivery
) -> None:
    await on_user_created(user_created(email="old@example.com"), cast(Any, uow), delivery)
    await uow.session.commit()
    recipient = await uow.session.get(Recipient, "usr_0123456789")
    assert recipient is not None
    recipient.email = "changed@example.com"  # as user.email_changed leaves it
    await uow.session.commit()
    await on_user_created(user_created(email="old@example.com"), cast(Any, uow), delivery)
    await uow.session.commit()

    assert recipient.email == "changed@example.com"


async def test_an_email_send_command_sends_its_subject_and_variables(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    command = email_send()

    await on_email_send(command, cast(Any, uow), delivery)
    await uow.session.commit()
    await on_email_send(command, cast(Any, uow), delivery)  # redelivered

    [message] = mailer.sent
    assert message["Subject"] == "Grace mentioned you"
    assert message["Message-ID"] == message_id_for(f"send:{command.data.request_id}")
    body = message.get_content()
    assert "Hi Ada," in body
    assert "Look at this\n\nhttps://x.test/d/1" in body
    [record] = await emails(uow)
    assert (record.id, record.template) == (
        email_id_for(f"send:{command.data.request_id}"),
        "notification",
    )


async def test_a_command_with_an_unsubscribe_url_carries_rfc_8058_one_click_headers(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    url = "https://notify.example.com/unsubscribe?token=u1.cGF5bG9hZA.c2ln"
    await on_email_send(email_send(list_unsubscribe_url=url), cast(Any, uow), delivery)
    await uow.session.commit()  # one delivery per transaction, as the runtime does
    await on_email_send(email_send(), cast(Any, uow), delivery)

    with_link, without = mailer.sent
    assert with_link["List-Unsubscribe"] == f"<{url}>"
    assert with_link["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert without["List-Unsubscribe"] is None
    assert without["List-Unsubscribe-Post"] is None


async def test_a_command_for_a_known_user_is_greeted_by_name_in_their_language(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    await on_user_created(user_created(locale="fr-FR"), cast(Any, uow), delivery)
    await uow.session.commit()

    await on_email_send(
        email_send(user_id="usr_0123456789", variables={"text": "Rapport prêt"}),
        cast(Any, uow),
        delivery,
    )

    assert mailer.sent[-1].get_content().startswith("Bonjour Ada,\n\nRapport prêt")


async def test_a_subject_with_line_breaks_cannot_add_headers(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    await on_email_send(
        email_send(subject="Hello\r\nBcc: eve@example.com"), cast(Any, uow), delivery
    )

    [message] = mailer.sent
    assert message["Bcc"] is None
    assert message["Subject"] == "Hello Bcc: eve@example.com"


def test_message_ids_derive_from_the_logical_key() -> None:
    assert message_id_for("welcome:usr_a1234567") == message_id_for("welcome:usr_a1234567")
    assert message_id_for("welcome:usr_a1234567") != message_id_for("welcome:usr_b1234567")
    assert message_id_for("welcome:usr_a1234567").endswith("@tributary.dev>")
    assert len(message_id_for("x")) == len("<@tributary.dev>") + 32


async def test_a_changed_address_is_where_later_mail_goes(tmp_path: Path) -> None:
    from tributary.contracts.envelope import new_event
    from tributary.contracts.events import UserEmailChangedV1
    from tributary.email.handlers import on_user_email_changed
    from tributary.email.models import Recipient

    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        uow.session.add(
            Recipient(
                user_id="usr_0123456789", email="old@example.com", given_name="Ada", locale="en-GB"
            )
        )
        await uow.session.commit()
        change = new_event(
            routing_key="user.email_changed.v1",
            source="/services/identity",
            data=UserEmailChangedV1(
                user_id="usr_0123456789",
                old_email="old@example.com",
                new_email="new@example.com",
                changed_at=datetime.now(UTC),
            ),
        )
        await on_user_email_changed(change, cast(Any, uow))
        recipient = await uow.session.get(Recipient, "usr_0123456789")
        assert recipient is not None
        assert recipient.email == "new@example.com"


async def test_a_forced_replay_sends_what_was_never_sent(
    uow: FakeUnitOfWork, mailer: FakeMailer, delivery: Delivery
) -> None:
    uow.is_replay, uow.suppress_side_effects = True, False  # eventctl replay ... --force

    await on_user_created(user_created(), cast(Any, uow), delivery)

    assert mailer.attempts == 1
    assert [r.status for r in await emails(uow)] == ["sent"]
