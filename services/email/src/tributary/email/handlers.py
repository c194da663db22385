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

**One welcome per address per window.** Before a welcome email is sent, a keyed hash (HMAC with
the service's address key) of the normalised address is looked up in ``welcome_sends``: an
address that got a welcome within ``EMAIL_WELCOME_WINDOW_HOURS`` (24 h) gets none now -- the
email is recorded as ``suppressed`` and nothing is emitted. Signing up, erasing and signing up
again cannot mail an address over and over. The table holds hashes only, so it survives erasure.

**Erasure** (``user.erased``): the user's ``recipients`` row goes, the records of their emails
(by user id, or sent to one of their addresses) keep their logical key -- so nothing is ever
sent twice -- but lose the address (``to`` becomes ``[erased]``) and the error text; the outbox
and the DLQs lose what mentions them; the user id is remembered, and later events about the
user (reordered, retried, replayed) send and store nothing.

Failures: a transient SMTP error (connection refused, timeout, 4xx) is raised, so the runtime
retries it in-process, then through the delayed-retry queues, then dead-letters it. A
permanent one (5xx to the recipient or the content) is an outcome, not an error: the row is
recorded as ``failed`` and ``email.failed.v1`` (``permanent: true``) is emitted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import format_datetime

from sqlalchemy import delete, func, or_, update
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
    UserErasedV1,
)
from tributary.email.mailer import PermanentSmtpError, Sender
from tributary.email.models import (
    ERASED_ADDRESS,
    EmailRecord,
    Recipient,
    WelcomeSend,
    email_id_for,
    message_id_for,
)
from tributary.email.templates import render
from tributary.messaging import context
from tributary.messaging.bus import Handlers
from tributary.messaging.db import as_utc, now
from tributary.messaging.erasure import MIN_LENGTH, remember_erased, was_erased
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.email")


DEVELOPMENT_ADDRESS_KEY = b"tributary-development-address-key"
"""Used when ``EMAIL_ADDRESS_KEY`` is not set (a warning is logged): never in production."""


@dataclass(frozen=True)
class Delivery:
    """How mail leaves: the SMTP client and the ``From`` address (built in ``create_app``)."""

    mailer: Sender
    from_address: str
    address_key: bytes = DEVELOPMENT_ADDRESS_KEY
    """The HMAC key of the address hashes the welcome window keeps."""
    welcome_window: timedelta = timedelta(hours=24)
    """At most one welcome email per address in this time; zero: no limit."""


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
    list_unsubscribe: str | None = None
    """RFC 8058 one-click unsubscribe URL (``email.send``'s ``list_unsubscribe_url``)."""


Gate = Callable[[Outgoing, UnitOfWork, Delivery], Awaitable[bool]]
"""Decides, once the logical key is known to be new, whether the email may go out now."""


def address_hash(address: str, key: bytes) -> str:
    """HMAC-SHA256 (hex) of the normalised address: the same mailbox whatever the case."""
    normalised = address.strip().lower()
    return hmac.new(key, normalised.encode(), hashlib.sha256).hexdigest()


async def welcome_window_open(mail: Outgoing, uow: UnitOfWork, delivery: Delivery) -> bool:
    """True (and the address's welcome claimed for now) unless the address got a welcome
    within the window. The claim is in the handler's transaction: a send that fails and is
    retried claims nothing; two deliveries claiming one address at once serialise on the row
    (the loser fails, is retried and finds the window closed)."""
    if delivery.welcome_window <= timedelta(0):
        return True
    digest = address_hash(mail.to, delivery.address_key)
    stamp = now()
    query = select(WelcomeSend).where(col(WelcomeSend.address_hash) == digest).with_for_update()
    last = (await uow.session.exec(query)).first()
    if last is None:
        uow.session.add(WelcomeSend(address_hash=digest, last_sent_at=stamp))
    elif as_utc(last.last_sent_at) > stamp - delivery.welcome_window:
        return False
    else:
        last.last_sent_at = stamp
        uow.session.add(last)
    await uow.session.flush()
    return True


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
        if mail.list_unsubscribe:  # RFC 8058: a POST to the URL unsubscribes, no page visit
            message["List-Unsubscribe"] = f"<{mail.list_unsubscribe}>"
            message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        message.set_content(mail.body)
    except (ValueError, TypeError) as exc:
        raise PermanentSmtpError(f"message cannot be built: {exc}") from exc
    return message


async def deliver(
    mail: Outgoing, uow: UnitOfWork, delivery: Delivery, *, gate: Gate | None = None
) -> None:
    """Send ``mail`` unless its logical key was sent (or failed for good) before.

    ``gate``: asked once the key is new; when it says no, the email is recorded as
    ``suppressed`` (so the key is settled for good) and nothing is sent or emitted.
    """
    email_id = email_id_for(mail.logical_key)
    if replayed(uow, mail.template):
        return
    known = await uow.session.exec(
        select(EmailRecord.id).where(col(EmailRecord.logical_key) == mail.logical_key)
    )
    if known.first() is not None:
        log.info("%s email %s was handled before: not sent again", mail.template, email_id)
        return
    allowed = gate is None or await gate(mail, uow, delivery)
    record = EmailRecord(
        id=email_id,
        logical_key=mail.logical_key,
        message_id=message_id_for(mail.logical_key),
        to=mail.to,
        template=mail.template,
        status="sending" if allowed else "suppressed",
        user_id=mail.user_id,
        correlation_id=context.current().correlation_id,
    )
    uow.session.add(record)
    await uow.session.flush()  # claims the logical key before anything leaves the building
    if not allowed:
        log.info(
            "%s email %s suppressed: its address had one within the window",
            mail.template,
            record.id,
        )
        return
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
    if await was_erased(uow.session, user.user_id):
        log.info("user.created for erased user %s: nothing stored or sent", user.user_id)
        return
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
    await deliver(mail, uow, delivery, gate=welcome_window_open)


async def on_subscription_activated(
    event: Event[SubscriptionActivatedV1], uow: UnitOfWork, delivery: Delivery
) -> None:
    subscription = event.data
    if replayed(uow, "subscription_activated"):
        return
    if await was_erased(uow.session, subscription.user_id):
        log.info("subscription mail for erased user %s: not sent", subscription.user_id)
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
    if await was_erased(uow.session, command.user_id):
        log.info("email.send for erased user %s: not sent", command.user_id)
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
        list_unsubscribe=command.list_unsubscribe_url,
    )
    await deliver(mail, uow, delivery)


async def on_user_email_changed(event: Event[UserEmailChangedV1], uow: UnitOfWork) -> None:
    """Apply an address change unless the recipient shows a later one already.

    Changes of one user arrive in any order (the relay publishes concurrently, retries and
    replays reorder), so the row keeps the ``changed_at`` of the change it shows and only a
    strictly later change replaces it; an equal one is a redelivery and changes nothing.
    """
    change = event.data
    if await was_erased(uow.session, change.user_id):
        return  # the address of an erased user is not kept, whatever its time
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


async def on_user_erased(event: Event[UserErasedV1], uow: UnitOfWork) -> None:
    """Forget the user's addresses everywhere this service keeps them (see the module doc).

    Never suppressed on replay: an erasure is not a side effect to skip. Handled again, it
    finds nothing left to change.
    """
    user_id = event.data.user_id
    recipient = await uow.session.get(Recipient, user_id)
    sent_to = select(EmailRecord.to).where(col(EmailRecord.user_id) == user_id)
    addresses = set((await uow.session.exec(sent_to)).all())
    if recipient is not None:
        addresses.add(recipient.email)
    addresses.discard(ERASED_ADDRESS)
    # the sweep first: it holds no database lock while the broker is read
    erased = await uow.erase_person(
        user_id, also=sorted(a for a in addresses if len(a) >= MIN_LENGTH)
    )
    mine = col(EmailRecord.user_id) == user_id
    if addresses:  # also mail to the address without the user id (email.send commands)
        mine = or_(mine, func.lower(col(EmailRecord.to)).in_(sorted(a.lower() for a in addresses)))
    anonymised = await uow.session.exec(
        update(EmailRecord).where(mine).values(to=ERASED_ADDRESS, error=None)
    )
    await uow.session.exec(delete(Recipient).where(col(Recipient.user_id) == user_id))
    await remember_erased(uow.session, user_id)
    log.info(
        "user %s erased: %d email record(s) anonymised, %d outbox row(s), %d dead letter(s)",
        user_id,
        anonymised.rowcount or 0,
        erased.outbox,
        erased.dead_letters.removed,
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
        UserErasedV1: on_user_erased,
    }


def command_handlers(delivery: Delivery) -> Handlers:
    async def email_send(event: Event[EmailSendV1], uow: UnitOfWork) -> None:
        await on_email_send(event, uow, delivery)

    return {EmailSendV1: email_send}
