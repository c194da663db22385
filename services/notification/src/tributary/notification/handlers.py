"""What the notification service does with each event it consumes.

Notifications (one per recipient, through the channels their preferences allow):

==========================  ==========  ===========================  ======================
event                       category    recipient                    source (dedup key)
==========================  ==========  ===========================  ======================
``workspace.created``       account     ``owner_id``                 the workspace id
``subscription.activated``  billing     ``user_id``                  the subscription id
``comment.mentioned``       mentions    ``mentioned_user_id``        the comment id
``report.ready``            reports     ``user_id``                  the report id
==========================  ==========  ===========================  ======================

``account`` notifications are critical and urgent. A mention of oneself notifies nobody. The
texts carry what the recipient may see: their workspace's name, their plan, their report's
name; never the comment's text (someone else's words, kept by the comments product) nor any
address. A link is kept only if it is ``http(s)``: a foreign producer's ``javascript:`` URL
never reaches a page.

The recipient directory (an address and a locale per user id, for email): ``user.created``
(v1 is upcast to v2), ``user.email_changed`` (a change not later than the one kept is ignored)
and ``user.erased``, which deletes everything the service holds about the user -- their
notifications, deliveries, preferences, inbox head and address, webhook endpoints, quiet hours,
held deliveries and digests -- purges the outbox (scheduled jobs too) and the DLQ of them, and
remembers the id so that late events about them store and send nothing.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from sqlalchemy import delete, or_, update
from sqlmodel import col

from tributary.contracts.envelope import Event
from tributary.contracts.events import (
    CommentMentionedV1,
    ReportReadyV1,
    SubscriptionActivatedV1,
    UserCreatedV2,
    UserEmailChangedV1,
    UserErasedV1,
    WorkspaceCreatedV1,
)
from tributary.messaging.bus import Handlers
from tributary.messaging.db import as_utc, now
from tributary.messaging.erasure import MIN_LENGTH, remember_erased, was_erased
from tributary.messaging.uow import UnitOfWork
from tributary.notification.channels import Dispatcher, Notice, RecipientNotYetKnown
from tributary.notification.models import (
    Address,
    Delivery,
    InboxHead,
    Notification,
    Preference,
)
from tributary.notification.quiet_models import forget as forget_quiet_hours_and_digests
from tributary.notification.webhooks import erase_user as erase_webhooks

log = logging.getLogger("tributary.notification")


def _quoted(text: str, limit: int = 120) -> str:
    """A name as shown in a text: one line, at most ``limit`` characters, in quotes."""
    one_line = " ".join(text.split())
    if len(one_line) > limit:
        one_line = one_line[: limit - 1] + "…"
    return f"“{one_line}”"


def safe_link(url: str) -> str | None:
    """``url`` if it is an absolute http(s) URL, else None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    if any(ch in url for ch in "\r\n\t\x00 "):
        return None
    return url


async def on_workspace_created(
    event: Event[WorkspaceCreatedV1], uow: UnitOfWork, dispatcher: Dispatcher
) -> None:
    workspace = event.data
    notice = Notice(
        user_id=workspace.owner_id,
        category="account",
        urgent=True,
        title="Your workspace is ready",
        body=f"Your workspace {_quoted(workspace.name)} is ready to use.",
        source=f"workspace.created:{workspace.workspace_id}",
        event_id=event.id,
    )
    await dispatcher.notify(notice, uow)


async def on_subscription_activated(
    event: Event[SubscriptionActivatedV1], uow: UnitOfWork, dispatcher: Dispatcher
) -> None:
    subscription = event.data
    notice = Notice(
        user_id=subscription.user_id,
        category="billing",
        title=f"Your {subscription.plan} plan is active",
        body=f"Thank you! Your {subscription.plan} plan is now active.",
        source=f"subscription.activated:{subscription.subscription_id}",
        event_id=event.id,
    )
    await dispatcher.notify(notice, uow)


async def on_comment_mentioned(
    event: Event[CommentMentionedV1], uow: UnitOfWork, dispatcher: Dispatcher
) -> None:
    mention = event.data
    if mention.mentioned_user_id == mention.author_user_id:
        log.info("comment %s: a mention of oneself notifies nobody", mention.comment_id)
        return
    notice = Notice(
        user_id=mention.mentioned_user_id,
        category="mentions",
        title="You were mentioned in a comment",
        body="Someone mentioned you in a comment. Open it to read it and reply.",
        url=safe_link(mention.url),
        source=f"comment.mentioned:{mention.comment_id}",
        event_id=event.id,
    )
    await dispatcher.notify(notice, uow)


async def on_report_ready(
    event: Event[ReportReadyV1], uow: UnitOfWork, dispatcher: Dispatcher
) -> None:
    report = event.data
    notice = Notice(
        user_id=report.user_id,
        category="reports",
        title="Your report is ready",
        body=f"Your report {_quoted(report.report_name)} is ready to download.",
        url=safe_link(report.url),
        source=f"report.ready:{report.report_id}",
        event_id=event.id,
    )
    await dispatcher.notify(notice, uow)


# -- the recipient directory -------------------------------------------------------------------


async def on_user_created(event: Event[UserCreatedV2], uow: UnitOfWork) -> None:
    user = event.data
    if await was_erased(uow.session, user.user_id):
        log.info("user.created for erased user %s: nothing stored", user.user_id)
        return
    if await uow.session.get(Address, user.user_id) is None:
        uow.session.add(Address(user_id=user.user_id, email=user.email, locale=user.locale))
    # else kept: an older fact must not undo a newer one (user.email_changed)


async def on_user_email_changed(event: Event[UserEmailChangedV1], uow: UnitOfWork) -> None:
    """Apply an address change unless the recipient shows a later one already (changes of one
    user arrive in any order; an equal ``changed_at`` is a redelivery)."""
    change = event.data
    if await was_erased(uow.session, change.user_id):
        return
    if await uow.session.get(Address, change.user_id) is None:
        raise RecipientNotYetKnown(
            f"address change for user {change.user_id} before its user.created was handled"
        )
    changed_at = as_utc(change.changed_at)
    shown = col(Address.email_changed_at)
    applied = await uow.session.exec(
        update(Address)
        .where(col(Address.user_id) == change.user_id)
        .where(or_(shown.is_(None), shown < changed_at))
        .values(email=change.new_email, email_changed_at=changed_at, updated_at=now())
        .execution_options(synchronize_session="fetch")
    )
    if not applied.rowcount:
        log.info("address change for user %s is older than the one kept", change.user_id)


async def on_user_erased(event: Event[UserErasedV1], uow: UnitOfWork) -> None:
    """Delete everything about the user (see the module doc). Never suppressed on replay: an
    erasure is not a side effect to skip; handled again, it finds nothing left."""
    user_id = event.data.user_id
    recipient = await uow.session.get(Address, user_id)
    addresses = [recipient.email] if recipient is not None else []
    # the sweep first: it holds no database lock while the broker is read
    erased = await uow.erase_person(user_id, also=[a for a in addresses if len(a) >= MIN_LENGTH])
    removed = await erase_webhooks(uow.session, user_id)  # endpoints, deliveries, attempts
    removed += await forget_quiet_hours_and_digests(uow.session, user_id)
    for table in (Notification, Delivery, Preference, InboxHead, Address):
        result = await uow.session.exec(delete(table).where(col(table.user_id) == user_id))
        removed += result.rowcount or 0
    await remember_erased(uow.session, user_id)
    log.info(
        "user %s erased: %d row(s), %d outbox row(s), %d dead letter(s) removed",
        user_id,
        removed,
        erased.outbox,
        erased.dead_letters.removed,
    )


def event_handlers(dispatcher: Dispatcher) -> Handlers:
    async def workspace_created(event: Event[WorkspaceCreatedV1], uow: UnitOfWork) -> None:
        await on_workspace_created(event, uow, dispatcher)

    async def subscription_activated(
        event: Event[SubscriptionActivatedV1], uow: UnitOfWork
    ) -> None:
        await on_subscription_activated(event, uow, dispatcher)

    async def comment_mentioned(event: Event[CommentMentionedV1], uow: UnitOfWork) -> None:
        await on_comment_mentioned(event, uow, dispatcher)

    async def report_ready(event: Event[ReportReadyV1], uow: UnitOfWork) -> None:
        await on_report_ready(event, uow, dispatcher)

    return {
        WorkspaceCreatedV1: workspace_created,
        SubscriptionActivatedV1: subscription_activated,
        CommentMentionedV1: comment_mentioned,
        ReportReadyV1: report_ready,
        UserCreatedV2: on_user_created,
        UserEmailChangedV1: on_user_email_changed,
        UserErasedV1: on_user_erased,
    }
