"""Order checks for handlers whose queue is not partitioned: the ``sequence`` extension.

Where events of one entity may arrive out of order (competing replicas on one work queue, a
retry that let later events pass), a handler that cares keeps the last sequence it applied
per entity (a column of its own row for the entity) and asks :func:`check_sequence` first:

* the next one (``last + 1``): apply it, and store its sequence with the change;
* stale (``<= last``): already applied or superseded; return without changing anything (the
  delivery is acked; counted in :data:`STALE`);
* early (``> last + 1``, an earlier one has not been applied yet): :class:`EarlyEvent` is
  raised, a transient failure: the runtime retries it in the process, then parks it in the
  delayed-retry tiers (``<queue>.retry.<n>``) until its predecessors have been applied. An
  event whose predecessor never comes ends in the DLQ as ``retries_exhausted``.

An event without a sequence fails with :class:`MissingSequence` (a :class:`PermanentError`:
dead-lettered at once); a malformed ``sequence`` never reaches a handler (the envelope check
dead-letters it as ``malformed``).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Literal

from tributary.contracts.envelope import CloudEvent
from tributary.messaging import context
from tributary.messaging.errors import PermanentError

log = logging.getLogger("tributary.messaging.sequence")

STALE: Counter[str] = Counter()
"""Stale events skipped, by consumer (this process)."""


class EarlyEvent(Exception):
    """An event arrived before its entity's previous one was applied: retried later."""


class MissingSequence(PermanentError):
    """The handler checks the order, and the event carries no ``sequence``."""


def check_sequence(
    event: CloudEvent[Any], last: int | None, *, first: int = 1, gaps: bool = False
) -> Literal["next", "stale"]:
    """Where ``event`` stands after ``last`` (the entity's last applied sequence, None if none).

    ``first`` is the sequence of an entity's first event. ``gaps``: apply any newer event
    (the latest state wins, skipped ones are never waited for) instead of exactly the next.
    """
    sequence = event.sequence
    if sequence is None:
        raise MissingSequence(f"{event.type} {event.id} has no sequence extension")
    expected = first if last is None else last + 1
    if sequence < expected:
        consumer = context.current().consumer or ""
        STALE[consumer] += 1
        log.info(
            "stale %s on %s: sequence %d, applied up to %s",
            event.type,
            consumer,
            sequence,
            last,
            extra={"event_id": event.id, "event_type": event.type, "outcome": "stale"},
        )
        return "stale"
    if sequence > expected and not gaps:
        raise EarlyEvent(f"sequence {sequence} arrived before {expected}")
    return "next"
