"""DLQ operations: list (nothing removed), replay to the work queue, archive to a file.

Every operation reads through a :class:`HeldReader`, so a message is removed from the DLQ
only by an explicit ack, and only after its copy is confirmed by the broker (replay) or
fsynced to the archive (archive). Whatever is not selected, or fails, stays in the DLQ.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from tributary.contracts.catalog import catalog
from tributary.eventctl.access import OPERATOR
from tributary.eventctl.archive import ArchiveFile, record
from tributary.eventctl.broker import HeldReader, require_queue
from tributary.eventctl.entries import DlqEntry, Selector, original_routing_key
from tributary.eventctl.progress import Pace, Stopped
from tributary.eventctl.report import Counts
from tributary.messaging import headers as h
from tributary.messaging.publisher import Publisher
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import QueueSet

# what the runtime adds when it gives up on a message: a replayed copy starts afresh
FAILURE_HEADERS = frozenset(
    {h.REASON, h.ERROR, h.CONSUMER, h.ATTEMPTS, h.RETRIES, h.FIRST_FAILURE, h.LAST_FAILURE}
    | {h.ANNOUNCEMENT}
)

Identity = tuple[str, str]


@dataclass(frozen=True)
class Scope:
    """What to act on: the filters, and at most ``limit`` selected messages."""

    selector: Selector
    limit: int | None = None

    def full(self, counts: Counts) -> bool:
        return self.limit is not None and counts.selected >= self.limit


def consumer_services(queues: QueueSet) -> tuple[str, ...]:
    """The services consuming a queue set: the service, or a command's consumers."""
    spec = catalog().types.get(queues.consumer)
    if spec is not None and spec.kind == "command":
        return spec.consumers
    return (queues.consumer,)


def dlq_trust(queues: QueueSet, user_prefix: str) -> dict[str, str | None]:
    """The users whose copies in this DLQ may name their original producer (the consumer
    itself and the operator), as :func:`tributary.messaging.headers.producer_of` takes them."""
    trusted: dict[str, str | None] = {f"{user_prefix}{OPERATOR}": None}
    for service in consumer_services(queues):
        trusted[f"{user_prefix}{service}"] = service
    return trusted


def replay_copy(
    message: AbstractIncomingMessage,
    *,
    user_prefix: str = "",
    trusted: Mapping[str, str | None] | None = None,
) -> aio_pika.Message:
    """The original body and properties, without the failure and broker headers (naming
    the announcement of the dead-lettering it replays, :data:`h.ANNOUNCED_BEFORE`).

    With ``trusted`` (see :func:`dlq_trust`), the copy names the message's producer as the
    consumer's sender check computes it: a producer header put into the DLQ by anyone but
    the consumer or the operator is replaced by that sender, and dropped if none is known.
    The operator publishes the copy, so the consumer trusts that header.
    """
    extra = {}
    drop = set(FAILURE_HEADERS)
    if h.ROUTING_KEY not in (message.headers or {}) and (key := original_routing_key(message)):
        extra[h.ROUTING_KEY] = key
    if (announced := h.header(message, h.ANNOUNCEMENT)) is not None:
        # failing again after the replay is a new dead letter, announced anew
        extra[h.ANNOUNCED_BEFORE] = h.text(announced)[:200]
    if trusted is not None:
        producer = h.producer_of(message, prefix=user_prefix, trusted=trusted)
        if producer is None:
            drop.add(h.PRODUCER)
        else:
            extra[h.PRODUCER] = producer
    return h.copy_of(message, extra, drop=drop)


def identity(message: AbstractIncomingMessage) -> Identity | None:
    """Two DLQ copies with the same id and body are the same message."""
    if not message.message_id:
        return None
    return message.message_id, hashlib.sha256(message.body).hexdigest()


async def list_entries(
    connection: AbstractConnection, dlq: str, scope: Scope
) -> tuple[list[DlqEntry], Counts]:
    """The selected messages of ``dlq``; every message stays where it is."""
    counts, entries = Counts(duplicate=None), []
    async with HeldReader(connection, dlq) as reader:
        async for message in reader:
            counts.scanned += 1
            entry = DlqEntry.of(message)
            if not scope.selector.matches(entry):
                counts.skipped += 1
                continue
            counts.selected += 1
            entries.append(entry)
            if scope.full(counts):
                break
    return entries, counts


async def replay(
    connection: AbstractConnection,
    queues: QueueSet,
    scope: Scope,
    *,
    batch: int,
    dry_run: bool,
    user_prefix: str | None = None,
    pace: Pace | None = None,
) -> Counts:
    """Republish selected messages to ``queues.work``; ack each DLQ copy after its confirm.

    ``user_prefix``: the broker user prefix (default ``TRIBUTARY_BROKER_USER_PREFIX``), to
    name each copy's producer for the consumer's sender check.
    """
    await require_queue(connection, queues.work)
    if user_prefix is None:
        user_prefix = MessagingSettings().broker_user_prefix
    publisher = Publisher(connection, in_flight=batch)
    await publisher.open()
    try:
        async with HeldReader(connection, queues.dlq) as reader:
            run = _Replay(
                reader, publisher, queues.work, batch, user_prefix, queues, pace or Pace()
            )
            await run.run(scope, dry_run=dry_run)
            return run.counts
    finally:
        await publisher.close()


class _Replay:
    """Republishes in batches of ``batch`` confirms in flight; stops after a failed batch.

    A second copy of a message (same id and body) is not republished: it is removed as a
    duplicate once the first copy is confirmed, and stays in the DLQ if that failed.
    """

    def __init__(
        self,
        reader: HeldReader,
        publisher: Publisher,
        target: str,
        batch: int,
        user_prefix: str,
        queues: QueueSet,
        pace: Pace,
    ) -> None:
        self.counts = Counts()
        self._pace = pace
        self._user_prefix = user_prefix
        self._trusted = dlq_trust(queues, user_prefix)
        self._reader = reader
        self._publisher = publisher
        self._target = target
        self._batch = batch
        self._seen: set[Identity] = set()
        self._confirmed: set[Identity] = set()
        self._originals: list[AbstractIncomingMessage] = []
        self._copies: list[AbstractIncomingMessage] = []

    async def run(self, scope: Scope, *, dry_run: bool) -> None:
        counts, pace = self.counts, self._pace
        async for message in self._reader:
            if pace.stopping:  # read, not started: handed back to the DLQ with the rest
                break
            pace.total(self._reader.total)
            counts.scanned += 1
            if not scope.selector.matches(DlqEntry.of(message)):
                counts.skipped += 1
                pace.advance()
                continue
            counts.selected += 1
            key = identity(message)
            if key is not None and key in self._seen:
                if dry_run:
                    counts.duplicate = (counts.duplicate or 0) + 1
                    pace.advance()
                else:
                    self._copies.append(message)
            else:
                if key is not None:
                    self._seen.add(key)
                if dry_run:
                    pace.advance()
                else:
                    self._originals.append(message)
            if len(self._originals) >= self._batch and not await self._flush():
                counts.interrupted = pace.stopping
                return
            if scope.full(counts):
                break
        await self._flush()
        counts.interrupted = pace.stopping

    async def _flush(self) -> bool:
        originals, copies = list(self._originals), list(self._copies)
        self._originals.clear()
        self._copies.clear()
        results = await asyncio.gather(*map(self._republish, originals), return_exceptions=True)
        stopped = any(isinstance(r, Stopped) for r in results)
        for message, result in zip(originals, results, strict=True):
            if isinstance(result, Stopped):
                continue  # not started (Ctrl-C): it stays in the DLQ
            if isinstance(result, BaseException):
                self.counts.failed += 1
                print(
                    f"eventctl: {message.message_id} not republished "
                    f"({type(result).__name__}: {result}); it stays in the DLQ",
                    file=sys.stderr,
                )
        for message in copies:
            if identity(message) in self._confirmed:
                self.counts.duplicate = (self.counts.duplicate or 0) + 1
                await _remove(self._reader, message, self.counts)
                self._pace.advance()
            elif not stopped and not self._pace.stopping:
                self.counts.failed += 1
        return not any(isinstance(r, BaseException) and not isinstance(r, Stopped) for r in results)

    async def _republish(self, message: AbstractIncomingMessage) -> None:
        await self._pace.admit()
        copy = replay_copy(message, user_prefix=self._user_prefix, trusted=self._trusted)
        await self._publisher.publish("", self._target, copy)
        self.counts.republished += 1
        self._pace.advance()
        if (key := identity(message)) is not None:
            self._confirmed.add(key)
        await _remove(self._reader, message, self.counts)


async def archive(
    connection: AbstractConnection,
    dlq: str,
    scope: Scope,
    path: Path,
    *,
    batch: int,
    dry_run: bool,
    pace: Pace | None = None,
) -> Counts:
    """Append selected messages to ``path``; ack them once the file is fsynced.

    After Ctrl-C the messages read so far are written and removed, the rest stay."""
    counts = Counts(duplicate=None)
    pace = pace or Pace()
    out = ArchiveFile(path)
    try:
        async with HeldReader(connection, dlq) as reader:
            pending: list[AbstractIncomingMessage] = []

            async def flush() -> None:
                out.write([record(dlq, m) for m in pending])
                counts.archived += len(pending)
                for message in pending:
                    await _remove(reader, message, counts)
                pace.advance(len(pending))
                pending.clear()

            async for message in reader:
                if pace.stopping:
                    break  # read, not archived: handed back to the DLQ with the rest
                pace.total(reader.total)
                if not scope.selector.matches(DlqEntry.of(message)):
                    counts.scanned += 1
                    counts.skipped += 1
                    pace.advance()
                    continue
                if not dry_run:
                    try:
                        await pace.admit()
                    except Stopped:
                        break
                counts.scanned += 1
                counts.selected += 1
                if dry_run:
                    pace.advance()
                else:
                    pending.append(message)
                    if len(pending) >= batch:
                        await flush()
                if scope.full(counts):
                    break
            await flush()
            counts.interrupted = pace.stopping
    finally:
        out.close()
    return counts


async def _remove(reader: HeldReader, message: AbstractIncomingMessage, counts: Counts) -> None:
    try:
        await reader.ack(message)
    except Exception as exc:  # channel gone: the broker requeued it, so it is in both places
        counts.unacked += 1
        print(f"eventctl: {message.message_id} could not be removed: {exc!r}", file=sys.stderr)
