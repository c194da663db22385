"""What makes the email service send: user.created, subscription.activated, ``email.send``.

Exactly-once is not on offer over SMTP; this is how close the service gets:

* every email has a **logical key** (``welcome:{user_id}``,
  ``subscription_activated:{subscription_id}``, ``send:{request_id}``) and a row in ``emails``
  keyed by it. A key that has a row is never sent again, whatever event id, version or
  redelivery carries it. A replayed delivery (``uow.is_replay``, unless forced) sends nothing
  and records no email (user.created still refreshes the ``recipients`` projection).
* the key is **claimed before the SMTP conversation**, in a short transaction of its own
  (committed on a connection of its own): the row is written as ``sending`` with a claim time
  and token, so no database lock is held while SMTP talks and deliveries are sent
  concurrently. Then, in the handler's transaction, the row becomes ``sent`` (with
  ``email.sent.v1`` in the outbox) or ``failed``. A delivery that finds the key ``sending``
  under a **fresh** claim (younger than ``EMAIL_CLAIM_LEASE_SECONDS``, 3 x SMTP_TIMEOUT by
  default: another consumer is on it) raises :class:`ClaimHeld`, a transient error: it is
  retried later and then finds the email settled, or the claim stale. A **stale** claim is
  taken over (a compare-and-set on the token) and the email sent -- with the same
  Message-ID. Two claimers of a new key meet on its unique index: one fails and is retried.
  The SMTP part of a delivery must end within half the lease, or it is abandoned as a
  timeout, so a live consumer's claim is never taken over.
* a transient SMTP failure gives the claim back at once (the row it made is deleted, the
  welcome window it took is given back), so the retry claims it anew.
* the catalog marks these types irreversible for ``email``, so the runtime handles them one
  per transaction: one email's failure never rolls back another's record.
* the ``Message-ID`` derives from the logical key (``<sha256(key)[:32]@tributary.dev>``).

Where a crash leaves things:

* **killed after the claim committed, before the SMTP server took the mail**: the redelivery
  finds a fresh claim and is retried (delayed-retry queues: 1 s, 10 s, 60 s) until the lease
  has passed, then takes it over and sends it, once. Keep the lease below the sum of the
  retry tiers, or the delivery is dead-lettered first (replay it: it is sent then).
* **killed after the SMTP server accepted the mail, before the handler's transaction
  committed ``sent``** (or that commit failed): the window that cannot be closed. After the
  lease the redelivery takes the claim over and the mail is sent again -- with the **same
  Message-ID**, so a receiving MTA or mail client that deduplicates on it shows it once.
  Closing the window would need the SMTP server to take part in our transaction, which it
  cannot. When the process lives on (a failed commit retried), it remembers the keys its SMTP
  server accepted and settles them without sending them again.

**One welcome per address per window.** Before a welcome email is sent, a keyed hash (HMAC with
the service's address key) of the normalised address is looked up in ``welcome_sends``, in the
claim's transaction: an address that got a welcome within ``EMAIL_WELCOME_WINDOW_HOURS`` (24 h)
gets none now -- the email is recorded as ``suppressed`` and nothing is emitted. Signing up,
erasing and signing up again cannot mail an address over and over. The table holds hashes
only, so it survives erasure.

**Erasure** (``user.erased``): the user's ``recipients`` row goes, the records of their emails
(by user id, or sent to one of their addresses) keep their logical key -- so nothing is ever
sent twice -- but lose the address (``to`` becomes ``[erased]``) and the error text; the outbox
and the DLQs lose what mentions them; the user id is remembered, and later events about the
user (reordered, retried, replayed) send and store nothing. A ``sending`` claim is anonymised
like the rest; one left by a crash is never taken over once its address is gone (it is settled
as ``suppressed``). A mail already in an SMTP conversation when the erasure commits still goes
out, but its ``email.sent`` carries no address (none is announced).

Failures: a transient SMTP error (connection refused, timeout, 4xx) is raised, so the runtime
retries it in-process, then through the delayed-retry queues, then dead-letters it. A
permanent one (5xx to the recipient or the content) is an outcome, not an error: the row is
recorded as ``failed`` and ``email.failed.v1`` (``permanent: true``) is emitted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from sqlalchemy import Column, Insert, Table, bindparam, delete, func, insert, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

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
from tributary.email.mailer import PermanentSmtpError, Sender, TransientSmtpError
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

# The statements of every mail, built once as Core statements on the tables (no ORM unit of
# work, no per-call statement building): their values are bound at execution.
EMAILS: Table = EmailRecord.__table__  # type: ignore[attr-defined]
RECIPIENTS: Table = Recipient.__table__  # type: ignore[attr-defined]
WELCOME_SENDS: Table = WelcomeSend.__table__  # type: ignore[attr-defined]


def _insert_new(dialect: str, table: Table, returning: Column[Any]) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING``: a row back when this insert made it."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing().returning(returning)


CLAIM_NEW = {name: _insert_new(name, EMAILS, EMAILS.c.id) for name in ("postgresql", "sqlite")}
WELCOME_NEW = {
    name: _insert_new(name, WELCOME_SENDS, WELCOME_SENDS.c.address_hash)
    for name in ("postgresql", "sqlite")
}
SETTLE = (
    update(EMAILS)
    .where(EMAILS.c.id == bindparam("email_id"), EMAILS.c.status == "sending")
    .values(
        status=bindparam("new_status", type_=EMAILS.c.status.type),
        sent_at=bindparam("new_sent_at", type_=EMAILS.c.sent_at.type),
        error=bindparam("new_error", type_=EMAILS.c.error.type),
        claimed_at=None,
        claimed_by=None,
    )
    .returning(EMAILS.c.to)
)
RECIPIENT_EMAIL = select(RECIPIENTS.c.email).where(RECIPIENTS.c.user_id == bindparam("user_id"))
NEW_RECIPIENT = insert(RECIPIENTS)


def dialect_of(session: AsyncSession) -> str:
    name = session.get_bind().dialect.name
    if name not in CLAIM_NEW:
        raise RuntimeError(f"the email service runs on SQLite or PostgreSQL, not {name}")
    return name


class Claims:
    """Where claims commit: sessions of their own (``bind``: the app's claim engine, whose
    connections the handlers' transactions never hold), else new sessions on the handler's
    engine (tests)."""

    def __init__(self) -> None:
        self.sessions: async_sessionmaker[AsyncSession] | None = None

    def bind(self, sessions: async_sessionmaker[AsyncSession] | None) -> None:
        self.sessions = sessions

    def session(self, uow: UnitOfWork) -> AsyncSession:
        if self.sessions is not None:
            return self.sessions()
        engine = uow.session.bind
        if not isinstance(engine, AsyncEngine):
            raise RuntimeError("the unit of work's session is not bound to an engine")
        return AsyncSession(engine, expire_on_commit=False)


ACCEPTED_REMEMBERED = 10_000
"""Logical keys accepted by SMTP that a process keeps in mind (see :meth:`Delivery.accepted`)."""


@dataclass(frozen=True)
class Delivery:
    """How mail leaves: the SMTP client and the ``From`` address (built in ``create_app``)."""

    mailer: Sender
    from_address: str
    address_key: bytes = DEVELOPMENT_ADDRESS_KEY
    """The HMAC key of the address hashes the welcome window keeps."""
    welcome_window: timedelta = timedelta(hours=24)
    """At most one welcome email per address in this time; zero: no limit."""
    claim_lease: timedelta = timedelta(seconds=30)
    """A claim older than this is taken over (its consumer died, or lost its transaction)."""
    claims: Claims = field(default_factory=Claims)
    accepted: OrderedDict[str, bool] = field(default_factory=OrderedDict)
    """Keys the SMTP server accepted in this process (the last few thousand): a retry after
    the handler's transaction failed settles them without sending them again."""

    def remember_accepted(self, logical_key: str) -> None:
        self.accepted[logical_key] = True
        self.accepted.move_to_end(logical_key)
        while len(self.accepted) > ACCEPTED_REMEMBERED:
            self.accepted.popitem(last=False)


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


class ClaimHeld(Exception):
    """Transient on purpose: another consumer claimed this email moments ago and may be
    talking SMTP right now; the delivery is retried and finds it settled, or the claim stale."""


@dataclass(frozen=True)
class Passed:
    """A gate's yes; ``undo`` gives back what it took if the email then fails transiently."""

    undo: Callable[[AsyncSession], Awaitable[None]] | None = None


Gate = Callable[[Outgoing, AsyncSession, Delivery], Awaitable[Passed | None]]
"""Decides, in the claim's transaction, once the logical key is new, whether the email may go
out now (``Passed``) or not (``None``)."""


def address_hash(address: str, key: bytes) -> str:
    """HMAC-SHA256 (hex) of the normalised address: the same mailbox whatever the case."""
    normalised = address.strip().lower()
    return hmac.new(key, normalised.encode(), hashlib.sha256).hexdigest()


async def welcome_window_open(
    mail: Outgoing, session: AsyncSession, delivery: Delivery
) -> Passed | None:
    """Passed (and the address's welcome claimed for now) unless the address got a welcome
    within the window. The claim is in the email's claim transaction: two deliveries claiming
    one address at once serialise on the row (the second waits for the first's claim to
    commit, then finds the window closed); an email that then fails transiently gives the
    window back.

    An address never welcomed (the usual case) costs one statement: the insert that claims
    its window. Only an address seen before is read (locked) and compared."""
    if delivery.welcome_window <= timedelta(0):
        return Passed()
    digest = address_hash(mail.to, delivery.address_key)
    stamp = now()
    new = WELCOME_NEW[dialect_of(session)]
    made = await session.exec(new, params={"address_hash": digest, "last_sent_at": stamp})
    mine = WELCOME_SENDS.c.address_hash == digest
    previous = None
    if made.first() is None:  # welcomed before: within the window?
        query = select(WELCOME_SENDS.c.last_sent_at).where(mine).with_for_update()
        last = (await session.exec(query)).first()
        if last is None:  # given back by a transient failure since the insert met it
            raise ClaimHeld(f"the welcome window of {mail.logical_key} changed meanwhile")
        if as_utc(last) > stamp - delivery.welcome_window:
            return None
        previous = last
        await session.exec(update(WELCOME_SENDS).where(mine).values(last_sent_at=stamp))

    async def undo(session: AsyncSession) -> None:
        if previous is None:
            await session.exec(delete(WELCOME_SENDS).where(mine))
        else:
            await session.exec(update(WELCOME_SENDS).where(mine).values(last_sent_at=previous))

    return Passed(undo)


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
        if mail.list_unsubscribe:  # RFC 8058: a POST to the URL unsubscribes, no page visit
            message["List-Unsubscribe"] = f"<{mail.list_unsubscribe}>"
            message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        message.set_content(mail.body)
        # after set_content, which replaces every Content-* header with its own
        message["Content-Language"] = mail.locale
    except (ValueError, TypeError) as exc:
        raise PermanentSmtpError(f"message cannot be built: {exc}") from exc
    return message


@dataclass(frozen=True)
class Claim:
    """This consumer's hold on one logical email, committed before it talks SMTP."""

    email_id: str
    message_id: str
    token: str
    created: bool
    """The claim made the row (a takeover found it): releasing it deletes the row."""
    gate: Passed | None = None
    accepted: bool = False
    """The SMTP server accepted this email in this process already: settle, do not resend."""


SETTLED = ("sent", "failed", "suppressed")


def _claimed_row(mail: Outgoing, email_id: str, token: str) -> dict[str, Any]:
    """The values of a new ``sending`` row, claimed by ``token`` now."""
    stamp = now()
    return {
        "id": email_id,
        "logical_key": mail.logical_key,
        "message_id": message_id_for(mail.logical_key),
        "to": mail.to,
        "template": mail.template,
        "status": "sending",
        "user_id": mail.user_id,
        "correlation_id": context.current().correlation_id,
        "created_at": stamp,
        "claimed_at": stamp,
        "claimed_by": token,
    }


async def claim(
    mail: Outgoing, uow: UnitOfWork, delivery: Delivery, gate: Gate | None
) -> Claim | None:
    """Claim ``mail`` in a short transaction of its own, committed before any SMTP.

    None: nothing to send (settled before, suppressed by the gate, or its recipient erased
    while a crashed claim waited). Raises :class:`ClaimHeld` while another consumer's claim
    is fresh.
    """
    email_id = email_id_for(mail.logical_key)
    token = secrets.token_hex(16)
    async with delivery.claims.session(uow) as session:
        # insert first (a new key is the usual case): on SQLite the insert takes the write
        # lock, so the gate below sees every other claim; on PostgreSQL a second claimer of
        # the key waits on the unique index for the first's claim, then inserts nothing and
        # reads the row below (fresh: held; settled: done; given back: its own row now)
        new = CLAIM_NEW[dialect_of(session)]
        made = (await session.exec(new, params=_claimed_row(mail, email_id, token))).first()
        if made is not None:
            try:
                passed = Passed() if gate is None else await gate(mail, session, delivery)
                if passed is None:
                    await session.exec(
                        update(EmailRecord)
                        .where(col(EmailRecord.id) == email_id)
                        .values(status="suppressed", claimed_at=None, claimed_by=None)
                    )
                await session.commit()
            except IntegrityError as exc:
                raise ClaimHeld(f"email {email_id} was claimed at the same moment") from exc
            if passed is None:
                log.info(
                    "%s email %s suppressed: its address had one within the window",
                    mail.template,
                    email_id,
                )
                return None
            return Claim(email_id, message_id_for(mail.logical_key), token, True, passed)
        row = (
            await session.exec(
                select(EmailRecord).where(col(EmailRecord.logical_key) == mail.logical_key)
            )
        ).first()
        if row is None:  # the claim the insert met was given back since: claim it anew
            raise ClaimHeld(f"email {email_id} was given back at the same moment: retried")
        if row.status in SETTLED:
            log.info("%s email %s was handled before: not sent again", mail.template, email_id)
            return None
        if delivery.accepted.get(mail.logical_key):  # sent by this process: settle it
            return Claim(email_id, row.message_id, token, created=False, accepted=True)
        if row.to == ERASED_ADDRESS:  # a crashed claim whose recipient was erased since
            await session.exec(
                update(EmailRecord)
                .where(col(EmailRecord.id) == email_id, col(EmailRecord.status) == "sending")
                .values(status="suppressed", claimed_at=None, claimed_by=None)
            )
            await session.commit()
            log.info("%s email %s not sent: its recipient was erased", mail.template, email_id)
            return None
        stamp = now()
        cutoff = stamp - delivery.claim_lease
        if row.claimed_at is not None and as_utc(row.claimed_at) > cutoff:
            raise ClaimHeld(
                f"email {email_id} is being sent by another consumer (claimed at "
                f"{as_utc(row.claimed_at).isoformat()}): retried later"
            )
        held = col(EmailRecord.claimed_by)
        taken = await session.exec(
            update(EmailRecord)
            .where(col(EmailRecord.id) == email_id, col(EmailRecord.status) == "sending")
            .where(held.is_(None) if row.claimed_by is None else held == row.claimed_by)
            .values(claimed_at=stamp, claimed_by=token, to=mail.to)
        )
        await session.commit()
        if not taken.rowcount:
            raise ClaimHeld(f"email {email_id} was taken over by another consumer")
        if row.claimed_at is not None:  # not released: its consumer died or lost track of it
            log.warning(
                "%s email %s: took over a claim older than %s s; it may have been sent "
                "already and is sent again with the same Message-ID",
                mail.template,
                email_id,
                f"{delivery.claim_lease.total_seconds():g}",
            )
        return Claim(email_id, row.message_id, token, created=False)


async def release(held: Claim, uow: UnitOfWork, delivery: Delivery) -> None:
    """Give a claim back after a transient failure: the retry claims it at once.

    A claim that made the row deletes it (and gives the welcome window back): a transient
    failure leaves nothing behind, as before claims were committed. A takeover clears the
    held. A failure here leaves the claim to expire with its lease.
    """
    mine = (col(EmailRecord.id) == held.email_id, col(EmailRecord.claimed_by) == held.token)
    try:
        async with delivery.claims.session(uow) as session:
            if held.created:
                gone = await session.exec(delete(EmailRecord).where(*mine))
                if gone.rowcount and held.gate is not None and held.gate.undo is not None:
                    await held.gate.undo(session)
            else:
                await session.exec(
                    update(EmailRecord).where(*mine).values(claimed_at=None, claimed_by=None)
                )
            await session.commit()
    except (OSError, SQLAlchemyError) as exc:
        log.warning("claim of email %s not released (it expires): %s", held.email_id, exc)


async def settle(
    mail: Outgoing, held: Claim, uow: UnitOfWork, failure: PermanentSmtpError | None
) -> None:
    """Mark the claimed email sent (``email.sent``) or failed (``email.failed``), in the
    handler's transaction; the inbox row and the outbox event commit with it."""
    stamp = now()
    status = "failed" if failure is not None else "sent"
    marked = await uow.session.exec(
        SETTLE,
        params={
            "email_id": held.email_id,
            "new_status": status,
            "new_sent_at": None if failure else stamp,
            "new_error": failure.reason if failure else None,
        },
    )
    to = marked.scalar_one_or_none()
    if to is None:
        log.info("%s email %s was settled by another consumer", mail.template, held.email_id)
        return
    if to == ERASED_ADDRESS:
        log.info(
            "%s email %s %s; its recipient was erased meanwhile",
            mail.template,
            held.email_id,
            status,
        )
        return
    subject = f"emails/{held.email_id}"
    if failure is not None:
        uow.outbox.add(
            EmailFailedV1(
                email_id=held.email_id,
                to=to,
                template=mail.template,
                reason=failure.reason,
                permanent=True,
                user_id=mail.user_id,
                failed_at=stamp,
            ),
            subject=subject,
            idempotency_key=f"email.failed:{held.email_id}",
        )
        log.warning("%s email %s failed for good: %s", mail.template, held.email_id, failure.reason)
        return
    uow.outbox.add(
        EmailSentV1(
            email_id=held.email_id,
            message_id=held.message_id,
            to=to,
            template=mail.template,
            user_id=mail.user_id,
            sent_at=stamp,
        ),
        subject=subject,
        idempotency_key=f"email.sent:{held.email_id}",
    )
    log.info("%s email %s sent", mail.template, held.email_id)


async def deliver(
    mail: Outgoing, uow: UnitOfWork, delivery: Delivery, *, gate: Gate | None = None
) -> None:
    """Send ``mail`` unless its logical key was sent (or failed for good) before.

    ``gate``: asked once the key is new; when it says no, the email is recorded as
    ``suppressed`` (so the key is settled for good) and nothing is sent or emitted.
    """
    if replayed(uow, mail.template):
        return
    # the claim reads the row: one settled before is not sent again
    held = await claim(mail, uow, delivery, gate)
    if held is None:
        return
    if not held.accepted:
        budget = delivery.claim_lease.total_seconds() / 2  # settled well within the lease
        try:
            message = compose(mail, delivery.from_address, held.message_id)
            async with asyncio.timeout(budget):
                await delivery.mailer.send(message)
        except PermanentSmtpError as exc:
            await settle(mail, held, uow, exc)
            return
        except TimeoutError as exc:
            await release(held, uow, delivery)
            raise TransientSmtpError(f"no answer from the SMTP server within {budget:g} s") from exc
        except Exception:
            await release(held, uow, delivery)
            raise
        delivery.remember_accepted(mail.logical_key)
    await settle(mail, held, uow, None)


async def remember_recipient(user: UserCreatedV2, uow: UnitOfWork, known: str | None) -> None:
    """Keep the address of ``user``: later events about the user carry only its id.

    ``known``: the address of the user's row as this transaction read it, none without a row
    (only user.created makes the row, and the inbox lets one delivery of it commit)."""
    if known is not None:
        return  # an older fact must not undo a newer one (user.email_changed): keep what is there
    await uow.session.exec(
        NEW_RECIPIENT,
        params={
            "user_id": user.user_id,
            "email": user.email,
            "given_name": user.given_name,
            "locale": user.locale,
            "updated_at": now(),
        },
    )


async def on_user_created(event: Event[UserCreatedV2], uow: UnitOfWork, delivery: Delivery) -> None:
    user = event.data
    if await was_erased(uow.session, user.user_id):
        log.info("user.created for erased user %s: nothing stored or sent", user.user_id)
        return
    known = (await uow.session.exec(RECIPIENT_EMAIL, params={"user_id": user.user_id})).first()
    text = render("welcome", user.locale, {"given_name": user.given_name})
    mail = Outgoing(
        logical_key=f"welcome:{user.user_id}",
        # the address changed since, if a forced replay sends it late
        to=known if known is not None else user.email,
        template="welcome",
        subject=text.subject,
        body=text.body,
        locale=user.locale,
        user_id=user.user_id,
    )
    # the claim commits on a connection of its own: this transaction writes nothing before it
    await deliver(mail, uow, delivery, gate=welcome_window_open)
    await remember_recipient(user, uow, known)  # a projection, rebuilt on replay too


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
