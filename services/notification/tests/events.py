"""Events as their producers publish them, for the notification service's tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from tributary.contracts.envelope import CloudEvent, new_event
from tributary.contracts.events import (
    CommentMentionedV1,
    ReportReadyV1,
    SubscriptionActivatedV1,
    UserCreatedV1,
    UserCreatedV2,
    UserEmailChangedV1,
    UserErasedV1,
    WorkspaceCreatedV1,
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def new_user() -> str:
    return new_id("usr")


def user_created(
    user_id: str, email: str = "ada@example.com", *, locale: str = "en-GB", version: int = 2
) -> CloudEvent[Any]:
    if version == 1:
        return new_event(
            routing_key="user.created.v1",
            source="/services/identity",
            data=UserCreatedV1(
                user_id=user_id,
                email=email,
                name="Ada Lovelace",
                plan="free",
                locale=locale,
                created_at=datetime.now(UTC),
            ),
        )
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


def email_changed(
    user_id: str, new: str, *, old: str = "ada@example.com", at: datetime | None = None
) -> CloudEvent[UserEmailChangedV1]:
    return new_event(
        routing_key="user.email_changed.v1",
        source="/services/identity",
        data=UserEmailChangedV1(
            user_id=user_id, old_email=old, new_email=new, changed_at=at or datetime.now(UTC)
        ),
    )


def user_erased(user_id: str) -> CloudEvent[UserErasedV1]:
    return new_event(
        routing_key="user.erased.v1",
        source="/services/identity",
        data=UserErasedV1(user_id=user_id, erased_at=datetime.now(UTC)),
    )


def workspace_created(
    owner_id: str, name: str = "Ada's workspace"
) -> CloudEvent[WorkspaceCreatedV1]:
    return new_event(
        routing_key="workspace.created.v1",
        source="/services/onboarding",
        data=WorkspaceCreatedV1(
            workspace_id=new_id("ws"), owner_id=owner_id, name=name, created_at=datetime.now(UTC)
        ),
    )


def subscription_activated(user_id: str) -> CloudEvent[SubscriptionActivatedV1]:
    return new_event(
        routing_key="subscription.activated.v1",
        source="/services/identity",
        data=SubscriptionActivatedV1(
            subscription_id=new_id("sub"),
            user_id=user_id,
            plan="pro",
            payment_id=new_id("pay"),
            activated_at=datetime.now(UTC),
        ),
    )


def comment_mentioned(
    mentioned: str,
    *,
    author: str | None = None,
    comment_id: str | None = None,
    url: str = "https://comments.example.com/d/1#c1",
) -> CloudEvent[CommentMentionedV1]:
    return new_event(
        routing_key="comment.mentioned.v1",
        source="/apps/comments",
        data=CommentMentionedV1(
            comment_id=comment_id or new_id("cmt"),
            document_id=new_id("doc"),
            author_user_id=author or new_user(),
            mentioned_user_id=mentioned,
            excerpt="@ada could you look at the totals before Friday?",
            url=url,
            mentioned_at=datetime.now(UTC),
        ),
    )


def report_ready(
    user_id: str, name: str = "Q3 revenue", *, url: str = "https://reports.example.com/r/1"
) -> CloudEvent[ReportReadyV1]:
    return new_event(
        routing_key="report.ready.v1",
        source="/apps/reports",
        data=ReportReadyV1(
            report_id=new_id("rpt"),
            user_id=user_id,
            report_name=name,
            url=url,
            ready_at=datetime.now(UTC),
        ),
    )
