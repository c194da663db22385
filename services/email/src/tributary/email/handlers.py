"""What makes the email service send: user.created, subscription.activated, ``email.send``.

Exactly-once is not on offer over SMTP; this is how close the service gets:

* every email has a **logical key** (``welcome:{user_id}``,
  ``subscription_activated:{subscription_id}``, ``send:{request_id}``) and a row in ``emails``
  keyed by it. A key that has a row is never sent again, whatever event id, version or
  redelivery carries it. A replayed delivery (``uow.is_replay``, unless forced) sends nothing
  and records no email (user.created still refreshes the ``recipients`` projection).
* the row is flushed *before* the SMTP conversation, inside the handler's transaction: on
  PostgreSQL a competing consumer handling the same logical email blocks on the unique key
  until this transaction ends, then fails, is retried, finds the row and does nothing (on
  SQLite the database write lock serialises them the same way).
* the catalog marks these types irreversible for ``email``, so the runtime handles them one
  per transaction: one email's failure never rolls back another's record.
* the ``Message-ID`` derives from the logical key (``<sha256(key)[:32]@tributary.dev>``).

The window that cannot be closed: the SMTP server accepts the mail and the process dies (or
the commit fails) before the transaction commits. The delivery is then redelivered, no row
exists, and the mail is sent again -- with the **same Message-ID**, so a receiving MTA or
mail client that deduplicates on it shows it once. Closing the window would need the SMTP
server to take part in our transaction, which it cannot.

Failures: a transient SMTP error (connection refused, timeout, 4xx) is raised, so the runtime
retries it in-process, then through the delayed-retry queues, then dead-letters it. A
permanent one (5xx to the recipient or the content) is an outcome, not an error: the row is
recorded as ``failed`` and ``email.failed.v1`` (``permanent: true``) is emitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime

from sqlalchemy import or_, update
from sqlmodel import col, select

from tributary.contracts.envelope import Event
from tributary.contracts.events import (
    EmailFailedV1,
    EmailSendV1,
    EmailSentV1,
    SubscriptionActivatedV1,
    Template,
    UserCreatedV2,
    UserEmailChangedV1,
)
from tributary.email.mailer import PermanentSmtpError, Sender
from tributary.email.models import EmailRecord, Recipient, email_id_for, message_id_for
from tributary.email.templates import render
from tributary.messaging import context
from tributary.messaging.bus import Handlers
from tributary.messaging.db import as_utc, now
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.email")


@dataclass(frozen=True)
class Delivery:
    """How mail leaves: the SMTP client and the ``From`` address (built in ``create_app``)."""

    mailer: Sender
    from_address: str


@dataclass(frozen=True)
class Outgoing:
    """One logical email, rendered."""

    logical_key: str
    to: str
    template: Template
    subject: str
    body: str
    locale: str
    user_id: str | None = None


class RecipientNotYetKnown(Exception):
    """Transient on purpose: the user's user.created may still be on its way or retrying."""


def replayed(uow: UnitOfWork, template: Template) -> bool:
    """True (and logged) for a replay not forced: nothing is sent or recorded."""
    if uow.suppress_side_effects:
        log.info("replayed delivery: %s email not sent", template)
    return uow.suppress_side_effects


def compose(mail: Outgoing, from_address: str, message_id: str) -> EmailMessage:
    try:
        message = EmailMessage()
        message["From"] = from_address
        message["To"] = mail.to
        message["Subject"] = " ".join(mail.subject.split())  # no line breaks: no header injection
        message["Message-ID"] = message_id
        message["Date"] = format_datetime(now())
        message["Content-Language"] = mail.locale
        message.set_content(mail.body)
    except (ValueError, TypeError) as exc:
        raise PermanentSmtpError(f"message cannot be built: {exc}") from exc
    return message


async def deliver(mail: Outgoing, uow: UnitOfWork, delivery: Delivery) -> None:
    """Send ``mail`` unless its logical key was sent (or failed for good) before."""
    email_id = email_id_for(mail.logical_key)
    if replayed(uow, mail.template):
        return
    known = await uow.session.exec(
        select(EmailRecord.id).where(col(EmailRecord.logical_key) == mail.logical_key)
    )
    if known.first() is not None:
        log.info("%s email %s was handled before: not sent again", mail.template, email_id)
        return
    record = EmailRecord(
        id=email_id,
        logical_key=mail.logical_key,
        message_id=message_id_for(mail.logical_key),
        to=mail.to,
        template=mail.template,
        status="sending",
        user_id=mail.user_id,
        correlation_id=context.current().correlation_id,
    )
    uow.session.add(record)
    await uow.session.flush()  # claims the logical key before anything leaves the building
    try:
        await delivery.mailer.send(compose(mail, delivery.from_address, record.message_id))
    except PermanentSmtpError as exc:
        record.status = "failed"
        record.error = exc.reason
        uow.outbox.add(
            EmailFailedV1(
                email_id=record.id,
                to=record.to,
                template=mail.template,
                reason=exc.reason,
                permanent=True,
                user_id=record.user_id,
                failed_at=now(),
            ),
            subject=f"emails/{record.id}",
            idempotency_key=f"email.failed:{record.id}",
        )
        log.warning("%s email %s failed for good: %s", mail.template, record.id, exc.reason)
        return
    record.status = "sent"
    record.sent_at = now()
    uow.outbox.add(
        EmailSentV1(
            email_id=record.id,
            message_id=record.message_id,
            to=record.to,
            template=mail.template,
            user_id=record.user_id,
            sent_at=record.sent_at,
        ),
        subject=f"emails/{record.id}",
        idempotency_key=f"email.sent:{record.id}",
    )
    log.info("%s email %s sent", mail.template, record.id)


async def remember_recipient(user: UserCreatedV2, uow: UnitOfWork) -> Recipient:
    """Keep the address of ``user``: later events about the user carry only its id."""
    recipient = await uow.session.get(Recipient, user.user_id)
    if recipient is None:
        recipient = Recipient(
            user_id=user.user_id,
            email=user.email,
            given_name=user.given_name,
            locale=user.locale,
        )
        uow.session.add(recipient)
    # else an older fact must not undo a newer one (user.email_changed): keep what is there
    return recipient


async def on_user_created(event: Event[UserCreatedV2], uow: UnitOfWork, delivery: Delivery) -> None:
    user = event.data
    recipient = await remember_recipient(user, uow)  # a projection, rebuilt on replay too
    text = render("welcome", user.locale, {"given_name": user.given_name})
    mail = Outgoing(
        logical_key=f"welcome:{user.user_id}",
        to=recipient.email,  # the address changed since, if a forced replay sends it late
        template="welcome",
        subject=text.subject,
        body=text.body,
        locale=user.locale,
        user_id=user.user_id,
    )
    await deliver(mail, uow, delivery)


async def on_subscription_activated(
    event: Event[SubscriptionActivatedV1], uow: UnitOfWork, delivery: Delivery
) -> None:
    subscription = event.data
    if replayed(uow, "subscription_activated"):
        return
    recipient = await uow.session.get(Recipient, subscription.user_id)
    if recipient is None:
        raise RecipientNotYetKnown(
            f"no address known for user {subscription.user_id} yet: "
            "its user.created has not been handled"
        )
    variables = {"given_name": recipient.given_name, "plan": subscription.plan}
    text = render("subscription_activated", recipient.locale, variables)
    mail = Outgoing(
        logical_key=f"subscription_activated:{subscription.subscription_id}",
        to=recipient.email,
        template="subscription_activated",
        subject=text.subject,
        body=text.body,
        locale=recipient.locale,
        user_id=subscription.user_id,
    )
    await deliver(mail, uow, delivery)


async def on_email_send(event: Event[EmailSendV1], uow: UnitOfWork, delivery: Delivery) -> None:
    command = event.data
    if replayed(uow, command.template):
        return
    recipient = await uow.session.get(Recipient, command.user_id) if command.user_id else None
    variables = dict(command.variables or {})
    if recipient is not None:
        variables.setdefault("given_name", recipient.given_name)
    locale = command.locale or (recipient.locale if recipient is not None else "en-GB")
    mail = Outgoing(
        logical_key=f"send:{command.request_id}",
        to=command.to,
        template=command.template,
        subject=command.subject,
        body=render(command.template, locale, variables).body,
        locale=locale,
        user_id=command.user_id,
    )
    await deliver(mail, uow, delivery)


async def on_user_email_changed(event: Event[UserEmailChangedV1], uow: UnitOfWork) -> None:
    """Apply an address change unless the recipient shows a later one already.

    Changes of one user arrive in any order (the relay publishes concurrently, retries and
    replays reorder), so the row keeps the ``changed_at`` of the change it shows and only a
    strictly later change replaces it; an equal one is a redelivery and changes nothing.
    """
    change = event.data
    # existence first: a row created after a conditional UPDATE missed it would read as stale
    if await uow.session.get(Recipient, change.user_id) is None:
        raise RecipientNotYetKnown(
            f"address change for user {change.user_id} before its user.created was handled"
        )
    changed_at = as_utc(change.changed_at)
    shown = col(Recipient.email_changed_at)
    # one conditional statement, not read-compare-write: of two changes applied at once, the
    # older cannot win (PostgreSQL re-checks the condition on the row once it holds the lock)
    applied = await uow.session.exec(
        update(Recipient)
        .where(col(Recipient.user_id) == change.user_id)
        .where(or_(shown.is_(None), shown < changed_at))
        .values(email=change.new_email, email_changed_at=changed_at, updated_at=now())
        .execution_options(synchronize_session="fetch")
    )
    if not applied.rowcount:
        log.info(
            "address change for user %s is not newer than the one kept: ignored", change.user_id
        )


def event_handlers(delivery: Delivery) -> Handlers:
    async def user_created(event: Event[UserCreatedV2], uow: UnitOfWork) -> None:
        await on_user_created(event, uow, delivery)

    async def subscription_activated(
        event: Event[SubscriptionActivatedV1], uow: UnitOfWork
    ) -> None:
        await on_subscription_activated(event, uow, delivery)

    return {
        UserCreatedV2: user_created,
        SubscriptionActivatedV1: subscription_activated,
        UserEmailChangedV1: on_user_email_changed,
    }


def command_handlers(delivery: Delivery) -> Handlers:
    async def email_send(event: Event[EmailSendV1], uow: UnitOfWork) -> None:
        await on_email_send(event, uow, delivery)

    return {EmailSendV1: email_send}
