"""The notification service's own metrics, on its ``/metrics`` beside the runtime's.

Counted when the transaction that did the work commits (a rolled-back attempt counts nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session
from sqlmodel.ext.asyncio.session import AsyncSession

_LISTENING = "tributary.notification.metrics.listening"
_PENDING = "tributary.notification.metrics.pending"

MENTION_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500)


class NotificationMetrics:
    def __init__(self) -> None:
        # registered in the app's own registry by the service factory (one per app)
        self.held = Counter(
            "tributary_notification_held",
            "Deliveries held by quiet hours, by channel",
            ["channel"],
            registry=None,
        )
        self.released = Counter(
            "tributary_notification_released",
            "Held deliveries whose quiet hours ended, by channel and outcome: delivered, "
            "switched_off (the channel was off by then), held_again (quiet hours moved)",
            ["channel", "outcome"],
            registry=None,
        )
        self.digests = Counter(
            "tributary_notification_digests",
            "Mention digests closed, by outcome: sent (its email staged or held), "
            "switched_off (mentions email off by then), empty",
            ["outcome"],
            registry=None,
        )
        self.digest_mentions = Histogram(
            "tributary_notification_digest_mentions",
            "Mentions listed per digest sent",
            buckets=MENTION_BUCKETS,
            registry=None,
        )

    def collectors(self) -> list[Collector]:
        return [self.held, self.released, self.digests, self.digest_mentions]


def after_commit(session: AsyncSession, count: Callable[[], Any]) -> None:
    """Call ``count`` once ``session``'s transaction has committed (never after a rollback)."""
    info = session.info
    if _LISTENING not in info:
        info[_LISTENING] = True

        def committed(sync_session: Session) -> None:
            for pending in sync_session.info.pop(_PENDING, ()):
                pending()

        def rolled_back(sync_session: Session) -> None:
            sync_session.info.pop(_PENDING, None)

        sa_event.listen(session.sync_session, "after_commit", committed)
        sa_event.listen(session.sync_session, "after_rollback", rolled_back)
    info.setdefault(_PENDING, []).append(count)
