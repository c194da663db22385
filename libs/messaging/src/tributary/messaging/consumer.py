"""The consumer runtime: parse, validate, upcast, dedupe (inbox), handle, commit, then ack.

Deliveries already waiting are handled together, up to ``batch_max`` in one transaction
(group commit); a failure in a batch replays it one message per transaction. Failures of the
message go through in-process retries, delayed-retry queues and finally the DLQ, each dead
letter announced as a ``message.dead_lettered`` event through the outbox
(:mod:`tributary.messaging.deadletters`). Nothing is acked before it is processed, recorded as
a duplicate, or confirmed by the broker in a retry queue or DLQ (and, dead-lettered, its
announcement committed), and a multiple-ack is sent only when every older delivery on the
channel is settled.

Failures of the infrastructure (the database unreachable or read-only, the broker refusing a
publish) are not the message's fault: they pause consumption. The consumer cancels its
subscription, keeps the deliveries it holds (returning them would charge each a delivery
against the quorum queue's limit), probes with backoff, then handles them and subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from aio_pika import Message
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.abc import AbstractChannel as AbstractChannelLike
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from tributary.contracts.catalog import CatalogError, VersionSpec, catalog
from tributary.contracts.envelope import CloudEvent, MalformedEvent, parse_event
from tributary.contracts.events import MessageDeadLetteredV1, Payload
from tributary.contracts.pii import scrub_text
from tributary.contracts.upcasting import NoUpcastPath, UpcastFailed, upcast
from tributary.contracts.validation import SchemaViolation, flat_check, validate
from tributary.messaging import context, deadletters, headers
from tributary.messaging.db import InboxRow, OutboxRow, is_sqlite, session_factory, utcnow
from tributary.messaging.erasure import Sweeper
from tributary.messaging.errors import (
    DlqReason,
    HandlerTimeout,
    InfrastructureError,
    PermanentError,
    Rejected,
)
from tributary.messaging.faults import as_infrastructure, brief, data_failure
from tributary.messaging.publisher import Publisher
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names, QueueSet
from tributary.messaging.uow import Outbox, UnitOfWork

log = logging.getLogger("tributary.messaging.consumer")
tracer = trace.get_tracer("tributary.messaging")

Handler = Callable[[CloudEvent[Any], UnitOfWork], Awaitable[None]]
_CLOSE_TIMEOUT = 5.0  # a broker that is gone must not hold up a shutdown
_WATCH_SECONDS = 5.0  # how often the subscription is checked
_STALL_SECONDS = 30.0  # a batch in hand this much longer than a handler may take: not progressing
OPERATOR = "eventctl"
"""The operator's broker user (without the prefix): its copies name their producer."""
_MAX_KEY = 400  # tributary_inbox.key
Outcome = Literal["processed", "duplicate", "retried", "dead_lettered", "requeued"]
"""``requeued``: handed back to the queue unprocessed (a stop, or a failure while settling)."""
OutcomeListener = Callable[["OutcomeRecord"], None]


@dataclass(frozen=True)
class Subscription:
    """A handler for one event type, written for one version of its payload."""

    payload_type: type[Payload]
    handler: Handler
    irreversible: bool


@dataclass(frozen=True)
class OutcomeRecord:
    consumer: str
    event_id: str | None
    event_type: str | None
    outcome: Outcome
    reason: str | None = None
    replay: bool = False
    duration: float | None = None
    """Seconds the handler took (processed outcomes)."""
    backlog: float | None = None
    """Seconds from the event's time to the start of its handling."""


@dataclass(frozen=True)
class _Announcement:
    payload: MessageDeadLetteredV1
    key: str
    event_id: str


@dataclass
class _Prepared:
    message: AbstractIncomingMessage
    event: CloudEvent[Any]
    sub: Subscription
    key: str
    digest: str
    ctx: context.MessageContext
    backlog: float
    duration: float | None = None


def sender_trust(service: str, own_user: str, settings: MessagingSettings) -> dict[str, str | None]:
    """The users whose copies name their original producer (retry tiers, DLQ, replay): the
    service's own (without the header, its own publication) and the operator's."""
    prefix = settings.broker_user_prefix
    return {f"{prefix}{OPERATOR}": None, own_user: service, f"{prefix}{service}": service}


def admit(
    spec: VersionSpec, payload_type: type[Payload], data: Any, *, shortcut: bool = True
) -> tuple[Payload, Any]:
    """The handler's payload from the ``data`` of an event of version ``spec``, and the data it
    was made of (upcast to the handler's version); :class:`Rejected` when it breaks its contract.

    The data is checked against its schema (tolerant), then upcast if the handler is written
    for another version, then validated by the handler's model. ``shortcut``: an event of the
    handler's own version whose schema is flat is checked by :func:`flat_check` (the same
    verdict, without jsonschema's cost); an upcast or a nested schema is validated in full.
    """
    own = spec.version == payload_type.version
    check = flat_check(spec.routing_key) if shortcut and own else None
    try:
        if check is not None:
            check(data)
        else:
            validate(spec.routing_key, data, "tolerant")
    except SchemaViolation as exc:
        raise Rejected("schema_invalid", str(exc)) from None
    if not own:
        try:
            data = upcast(spec.type, spec.version, data, payload_type.version)
        except NoUpcastPath as exc:
            raise Rejected("unknown_type", str(exc)) from None
        except UpcastFailed as exc:
            raise Rejected("upcast_failed", f"{exc}: {exc.__cause__}") from None
    try:
        payload = payload_type.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Rejected("schema_invalid", f"data.{where}: {first['msg']}") from None
    return payload, data


def payload_hash(data: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a payload (sorted keys, no spaces)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class QueueConsumer:
    """Consumes one queue set (a service's work queue, or a command queue)."""

    def __init__(
        self,
        *,
        service: str,
        queues: QueueSet,
        subscriptions: Mapping[str, Subscription],
        engine: AsyncEngine,
        publisher: Publisher,
        names: Names,
        settings: MessagingSettings,
        on_commit: Callable[[], None],
        listeners: list[OutcomeListener],
        broker_ready: Callable[[], bool] = lambda: True,
        sweeper: Sweeper | None = None,
    ) -> None:
        self.service = service
        self._sweeper = sweeper
        self.queues = queues
        self._subs = dict(subscriptions)
        self._sessions = session_factory(engine)
        self._sqlite = is_sqlite(engine)
        self._publisher = publisher
        self._names = names
        self._settings = settings
        self._on_commit = on_commit
        self._listeners = listeners
        self._broker_ready = broker_ready
        self._source = f"/services/{service}"
        self._verify = settings.verify_sender
        self._user_prefix = settings.broker_user_prefix
        self._trusted = sender_trust(service, getattr(publisher, "user", "guest"), settings)
        self._pending: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        # every delivery handed to us and not yet acked, nacked or rejected, by id(message),
        # with the channel and tag it came on (read while the channel is open: aio-pika refuses
        # ``message.channel`` once it has closed)
        self._unsettled: dict[int, tuple[AbstractIncomingMessage, AbstractChannelLike, int]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._cautious = False
        self._stopping = False
        self._speedup: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._suspect = False  # the subscription looked lost on the last check
        # the circuit breaker: set while an outage pauses consumption
        self._paused: InfrastructureError | None = None
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._probing: asyncio.Task[None] | None = None
        self._backoff = 0.0
        self._busy_since: float | None = None
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(settings.inprocess_retries),
            wait=wait_exponential_jitter(
                multiplier=settings.inprocess_backoff_seconds, max=2.0, jitter=0.05
            ),
            retry=retry_if_exception(lambda exc: not _final(exc)),
            reraise=True,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel = await connection.channel()
        # ensure=True registers the queue with the robust channel: only then are it and its
        # consumer restored after a reconnect
        self._queue = await self._channel.get_queue(self.queues.work, ensure=True)
        # a partition queue is handled in delivery order: one worker
        workers = 1 if self.queues.ordered else self._settings.concurrency
        self._workers = [
            asyncio.create_task(self._work(), name=f"{self.queues.work}-worker-{n}")
            for n in range(workers)
        ]
        # Cautious start: one message at a time while the broker hands back redeliveries.
        # Every message a crashed consumer held is charged a delivery; taking them one by one
        # means a poison message that kills us again is charged alone, not with its neighbours.
        # Not on a partition queue: raising the prefetch re-subscribes, and a cancel there hands
        # the queue to another replica while this one still holds earlier deliveries.
        self._cautious = self._settings.prefetch > 1 and not self.queues.ordered
        await self._channel.set_qos(prefetch_count=1 if self._cautious else self._settings.prefetch)
        self._tag = await self._queue.consume(self._on_message)
        self._watch = asyncio.create_task(self._watchdog(), name=f"{self.queues.work}-watch")

    async def _full_speed(self) -> None:
        """The first fresh delivery: re-subscribe with the configured prefetch."""
        if self._channel is None or self._paused is not None or self._stopping:
            return
        try:
            await self._unsubscribe()
            await self._channel.set_qos(prefetch_count=self._settings.prefetch)
            await self._subscribe()
        except Exception as exc:  # closing or reconnecting: the watchdog subscribes again
            log.warning("raising prefetch on %s failed: %s", self.queues.work, exc)

    @property
    def running(self) -> bool:
        return (
            self._tag is not None
            and self._channel is not None
            and not self._channel.is_closed
            and self._paused is None
            and all(not w.done() for w in self._workers)
        )

    @property
    def paused(self) -> str | None:
        """Why consumption is paused by an outage, or None."""
        return str(self._paused) if self._paused is not None else None

    async def health(self) -> tuple[bool, str | None]:
        """Ready, or why not: paused by an outage, not subscribed, or stuck on a batch."""
        if self._paused is not None:
            return False, f"paused: {self._paused}"
        if any(w.done() for w in self._workers):
            return False, f"{self.queues.work}: a worker has stopped"
        if not await self._registered():
            return False, f"{self.queues.work}: no consumer registered with the broker"
        limit = self._settings.handler_timeout_seconds + _STALL_SECONDS
        if self._busy_since is not None and time.monotonic() - self._busy_since > limit:
            return False, f"{self.queues.work}: no progress for over {limit:.0f} s"
        return True, None

    async def stop(self) -> None:
        """Cancel the subscription, finish every delivery in hand, then close.

        Cancelling first means nothing new arrives while the grace period runs; what is
        already here is handled and acked rather than handed back, because every return is
        charged against the quorum queue's delivery limit. Only deliveries still unsettled
        when the grace period ends (or held by a paused consumer) are returned.
        """
        self._stopping = True
        for task in (self._speedup, self._watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.queues.ordered:
            await self._stop_ordered()
            return
        await self._unsubscribe()
        await asyncio.sleep(0)  # let deliveries dispatched before the cancel-ok reach us
        self._resumed.set()  # a paused consumer gives up what it holds
        await self._end_workers()
        for message, _channel, _tag in list(self._unsettled.values()):
            await self._requeue(message, "stopping")
        await self._close_channel()

    async def _end_workers(self) -> None:
        """Tell every worker to finish its batch and end (within the shutdown grace, else
        cancelled), and stop the outage probe."""
        for _ in self._workers:
            self._pending.put_nowait(None)
        if self._workers:
            _done, late = await asyncio.wait(
                self._workers, timeout=self._settings.shutdown_grace_seconds
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)

    async def _close_channel(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            try:
                await asyncio.wait_for(self._channel.close(), _CLOSE_TIMEOUT)
            except Exception as exc:
                log.debug("closing the channel of %s failed: %s", self.queues.work, exc)

    async def _stop_ordered(self) -> None:
        """Stop a partition queue's consumer without letting the next replica overtake it.

        A cancel would make another replica's consumer active at once, while deliveries this
        one holds (earlier events of the same entities) are still being handled. So: finish
        the batch in hand, then close the channel with the consumer still on it; the broker
        returns every other delivery, in order, to the next active consumer (each charged a
        delivery against the queue's limit).
        """
        while not self._pending.empty():  # not handled: they stay unsettled, returned below
            self._pending.get_nowait()
        self._resumed.set()
        await self._end_workers()
        await self._close_channel()  # unreachable: the broker returns them when it notices
        self._tag = None
        for message, _channel, _tag in list(self._unsettled.values()):
            del self._unsettled[id(message)]
            replay = self._is_replay(message)
            self._record(
                message, "requeued", message.message_id, message.type, replay, None, "stopping"
            )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._unsettled[id(message)] = (message, message.channel, message.delivery_tag or 0)
        self._pending.put_nowait(message)
        if self._cautious and not message.redelivered and not self._stopping:
            self._cautious = False
            self._speedup = asyncio.create_task(self._full_speed())

    # -- the subscription ------------------------------------------------------------------

    async def _subscribe(self) -> None:
        if self._queue is not None and self._tag is None:
            self._tag = await asyncio.wait_for(
                self._queue.consume(self._on_message), _CLOSE_TIMEOUT
            )

    async def _unsubscribe(self) -> None:
        """Cancel our consumer (deliveries already sent stay ours, unacked)."""
        tag, self._tag = self._tag, None
        if self._queue is not None and tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(tag), _CLOSE_TIMEOUT)
            except Exception as exc:  # channel already gone: the broker forgot it too
                log.debug("cancel on %s failed: %s", self.queues.work, exc)

    async def _registered(self) -> bool:
        """Our consumer tag is live on an open channel."""
        if self._tag is None or self._channel is None or self._channel.is_closed:
            return False
        try:
            underlying = await self._channel.get_underlay_channel()
        except Exception:  # reconnecting
            return False
        return self._tag in getattr(underlying, "consumers", {})

    async def _watchdog(self) -> None:
        """Re-register a subscription the broker dropped (a cancel, a closed channel).

        A robust channel restores its consumers after a reconnect, but not one that was
        cancelled just before the connection dropped, nor one the broker cancelled. A lost
        subscription is acted on when seen on two checks in a row, so a reconnect in progress
        is left to finish.
        """
        checks = 0
        while not self._stopping:
            await asyncio.sleep(_WATCH_SECONDS)
            if self._paused is not None or self._stopping:
                self._suspect = False
                continue
            checks += 1
            lost = not await self._registered()
            if not lost and checks % 6 == 0:
                lost = await self._broker_sees_no_consumer()
            if lost and self._suspect and self._channel is not None:
                if self._channel.is_closed:
                    continue  # the robust connection reopens it and restores the consumer
                log.warning("consumer on %s lost: subscribing again", self.queues.work)
                try:
                    await self._unsubscribe()
                    await self._subscribe()
                except Exception as exc:
                    log.warning("subscribing to %s failed: %s", self.queues.work, exc)
                lost = False
            self._suspect = lost

    async def _broker_sees_no_consumer(self) -> bool:
        channel = self._channel
        if channel is None or channel.is_closed:
            return False
        probe: AbstractChannel | None = None
        try:
            probe = await self._connection.channel()  # type: ignore[union-attr]
            # a robust channel would answer a passive declare from its cache
            declared = await probe.declare_queue(
                self.queues.work,
                passive=True,
                robust=False,  # type: ignore[call-arg]
            )
            return (declared.declaration_result.consumer_count or 0) == 0
        except Exception as exc:
            log.debug("consumer check on %s failed: %s", self.queues.work, exc)
            return False
        finally:
            if probe is not None and not probe.is_closed:
                with contextlib.suppress(Exception):
                    await probe.close()

    # -- the circuit breaker ---------------------------------------------------------------

    async def _pause(self, failure: InfrastructureError) -> None:
        """Stop taking deliveries until the failed component works; returns on resume/stop."""
        if self._paused is None:
            self._paused = failure
            self._resumed.clear()
            log.warning(
                "consumption of %s paused: %s",
                self.queues.work,
                failure,
                extra={"consumer": self.queues.consumer, "outcome": "paused"},
            )
            if not self.queues.ordered:
                # a partition queue keeps its consumer: a cancel would hand it to another
                # replica while this one holds earlier events (the prefetch bounds what waits)
                await self._unsubscribe()
            self._probing = asyncio.create_task(self._probe(failure.component))
        await self._resumed.wait()

    async def _probe(self, component: str) -> None:
        while not self._stopping:
            self._backoff = min(max(self._backoff * 2, 0.2), self._settings.pause_probe_max_seconds)
            jitter = random.uniform(0.8, 1.2)  # noqa: S311 (spreads retries; not a secret)
            await asyncio.sleep(self._backoff * jitter)
            try:
                if component == "database":
                    await self._probe_database()
                elif not self._broker_ready():
                    continue
                await self._subscribe()
            except Exception as exc:
                log.info("%s still unavailable for %s: %s", component, self.queues.work, brief(exc))
                continue
            log.warning(
                "consumption of %s resumed",
                self.queues.work,
                extra={"consumer": self.queues.consumer, "outcome": "resumed"},
            )
            self._paused = None
            self._resumed.set()
            return

    async def _probe_database(self) -> None:
        """A write that really writes: a read-only database passes ``SELECT 1`` but not this.

        PostgreSQL refuses any UPDATE in a read-only transaction, even one matching no row;
        SQLite only fails when a page is written, so it rewrites its ``user_version`` header.
        """
        async with self._sessions() as session, session.begin():
            if self._sqlite:
                version = (await session.exec(text("PRAGMA user_version"))).scalar_one()  # type: ignore[call-overload]
                await session.exec(text(f"PRAGMA user_version = {int(version)}"))  # type: ignore[call-overload]
            else:
                await session.exec(  # type: ignore[call-overload]
                    text("UPDATE tributary_outbox_lease SET owner = owner WHERE name = ''")
                )

    # -- the work loop ---------------------------------------------------------------------

    async def _next_batch(self) -> list[AbstractIncomingMessage] | None:
        first = await self._pending.get()
        if first is None:
            return None
        batch = [first]
        # never wait to fill a batch: take only what is already here
        while len(batch) < self._settings.batch_max and not self._pending.empty():
            nxt = self._pending.get_nowait()
            if nxt is None:
                self._pending.put_nowait(None)
                break
            batch.append(nxt)
        return batch

    async def _work(self) -> None:
        while (batch := await self._next_batch()) is not None:
            self._busy_since = time.monotonic()
            try:
                await self._work_on(batch)
            except Exception:  # never let a worker die: its deliveries would be held forever
                log.exception("worker on %s failed", self.queues.work)
            finally:
                self._busy_since = None
            if self._stopping and self._paused is not None:
                return

    async def _work_on(self, batch: list[AbstractIncomingMessage]) -> None:
        while batch:
            batch = self._drop_orphans(batch)
            if not batch:
                return
            if self._paused is not None:
                await self._resumed.wait()
            if self._paused is not None:  # stopping while paused: hand them back
                return
            try:
                await self.handle(batch)
                self._backoff = 0.0
            except InfrastructureError as failure:
                await self._pause(failure)
            except Exception:  # handle() settles each delivery; this is a bug in it
                log.exception("batch on %s failed unexpectedly", self.queues.work)
                for message in batch:
                    if not self._settled(message):
                        await self._requeue(message, "unexpected_error")
            batch = [m for m in batch if not self._settled(m)]

    def _drop_orphans(self, batch: list[AbstractIncomingMessage]) -> list[AbstractIncomingMessage]:
        """Deliveries of a channel that has closed are the broker's again (it redelivers them);
        handling them would only make duplicates."""
        kept = []
        for message in batch:
            entry = self._unsettled.get(id(message))
            if entry is not None and entry[1].is_closed:
                del self._unsettled[id(message)]
                replay = self._is_replay(message)
                self._record(
                    message,
                    "requeued",
                    message.message_id,
                    message.type,
                    replay,
                    None,
                    "channel_closed",
                )
            elif entry is not None:
                kept.append(message)
        return kept

    # -- one batch ---------------------------------------------------------------------------

    async def handle(self, batch: list[AbstractIncomingMessage]) -> None:
        """Settle every delivery of ``batch``; raises only :class:`InfrastructureError`."""
        prepared: list[_Prepared] = []
        for message in batch:
            if (returned := self._returned(message)) is not None:
                await self._guarded(
                    message,
                    None,
                    self._dead_letter(
                        message,
                        "delivery_limit",
                        f"handed back {returned} times without being settled (its consumer "
                        f"stopped or lost its channel each time); delivery limit "
                        f"{self._settings.delivery_limit}",
                        attempts=returned,
                    ),
                )
                continue
            try:
                prepared.append(self._prepare(message))
            except Rejected as rejected:
                await self._guarded(
                    message,
                    None,
                    self._dead_letter(message, rejected.reason, rejected.detail, attempts=0),
                )
            except Exception as exc:
                await self._unexpected(message, exc, None)
        groupable = [p for p in prepared if not p.sub.irreversible]
        if self.queues.ordered and len(groupable) < len(prepared):
            groupable = []  # one by one, in delivery order
        one_by_one = prepared
        if len(groupable) > 1 and self._settings.batch_max > 1:
            try:
                await self._transact(groupable)
                one_by_one = [p for p in prepared if p.sub.irreversible]
            except InfrastructureError:
                raise
            except Exception as exc:
                log.info(
                    "batch of %d on %s failed (%s): handling one per transaction",
                    len(groupable),
                    self.queues.work,
                    type(exc).__name__,
                )
        for p in one_by_one:
            if not self._settled(p.message):
                await self._guarded(p.message, p, self._single(p))

    async def _guarded(
        self, message: AbstractIncomingMessage, p: _Prepared | None, work: Awaitable[None]
    ) -> None:
        """Run ``work``; anything it did not expect dead-letters this message alone."""
        try:
            await work
        except InfrastructureError:
            raise
        except Exception as exc:
            await self._unexpected(message, exc, p)

    async def _unexpected(
        self, message: AbstractIncomingMessage, exc: Exception, p: _Prepared | None
    ) -> None:
        if self._settled(message):
            return
        log.error(
            "unexpected %s for a delivery on %s: dead-lettering it",
            type(exc).__name__,
            self.queues.work,
            exc_info=exc,
        )
        try:
            await self._dead_letter(
                message,
                "unexpected_error",
                _describe(exc),
                attempts=p.ctx.attempt if p else 0,
                prepared=p,
                exception=type(exc).__name__,
            )
        except InfrastructureError:
            raise
        except Exception as again:  # even the DLQ copy failed: give it back to the queue
            log.error("dead-lettering on %s failed: %s", self.queues.work, brief(again))
            await self._requeue(message, "unexpected_error")

    def _returned(self, message: AbstractIncomingMessage) -> int | None:
        """How often a delivery on its last chance was handed back, or None if it is not.

        The quorum queue counts every return (a stop, a lost channel, a consumer that died
        holding it) and dead-letters a delivery returned once more than the delivery limit.
        The runtime dead-letters it itself when it arrives with the limit reached, before
        handling it: whatever made it come back that often (typically a message that kills
        its consumer) would only return it once more, and the broker's dead-lettering says
        nothing to anyone. The broker's limit stays the backstop.
        """
        if not message.redelivered:
            return None
        returned = headers.int_header(message, headers.DELIVERY_COUNT)
        return returned if returned >= self._settings.delivery_limit else None

    def _prepare(self, message: AbstractIncomingMessage) -> _Prepared:
        try:
            event = parse_event(message.body)
        except MalformedEvent as exc:
            raise Rejected("malformed", str(exc)) from None
        try:
            spec = catalog().by_ce_type(event.type)
        except CatalogError as exc:
            raise Rejected("unknown_type", str(exc)) from None
        sub = self._subs.get(spec.type)
        if sub is None:
            raise Rejected(
                "unknown_type", f"{self.queues.consumer} has no handler for {event.type}"
            )
        producer = self._producer(message)
        if self._verify:
            allowed = catalog().type(spec.type).producers
            if producer not in allowed:
                sender = repr(producer) if producer else "an unnamed sender"
                raise Rejected(
                    "unauthorized_producer",
                    f"{spec.type} from {sender} (user {message.user_id!r}); "
                    f"may be published by {', '.join(allowed) or 'nobody'}",
                )
        payload, data = admit(spec, sub.payload_type, event.data)
        return _Prepared(
            backlog=max(0.0, time.time() - event.time.timestamp()),
            message=message,
            event=event.model_copy(update={"data": payload}),
            sub=sub,
            key=self._inbox_key(event.inbox_key, producer),
            digest=payload_hash(data),
            ctx=context.MessageContext(
                correlation_id=event.correlationid,
                causation_id=event.id,
                event_id=event.id,
                event_type=event.type,
                consumer=self.queues.consumer,
                attempt=headers.int_header(message, headers.ATTEMPTS) + 1,
                is_replay=self._is_replay(message),
                replay_forced=self._is_replay(message) and headers.is_forced_replay(message),
            ),
        )

    # -- the sender check ------------------------------------------------------------------

    def _producer(self, message: AbstractIncomingMessage) -> str | None:
        """The delivery's producer (see :func:`headers.producer_of`)."""
        return headers.producer_of(message, prefix=self._user_prefix, trusted=self._trusted)

    def _is_replay(self, message: AbstractIncomingMessage) -> bool:
        """The replay marker counts only on copies of the operator (or of this service, a retry
        of a replayed delivery) when senders are verified; anyone else's is ignored."""
        if not headers.is_replay(message):
            return False
        return not self._verify or message.user_id in self._trusted

    def _inbox_key(self, key: str, producer: str | None) -> str:
        """Verified senders: the key is the producer's own, so no producer can take another's
        key; unverified: the event's key as it is (the rows already stored stay valid)."""
        if not self._verify or producer is None:
            return key
        scoped = f"{producer}|{key}"
        if len(scoped) <= _MAX_KEY:
            return scoped
        return f"{producer[:100]}|sha256:{hashlib.sha256(scoped.encode()).hexdigest()}"

    def _copy(self, message: AbstractIncomingMessage, extra: dict[str, Any]) -> Message:
        """A copy for a retry queue or the DLQ that keeps who produced the delivery: the
        verified producer in :data:`headers.PRODUCER`, a replay marker only if honoured."""
        drop: set[str] = set()
        if self._verify:
            if (producer := self._producer(message)) is not None:
                extra = {**extra, headers.PRODUCER: producer}
            else:
                drop.add(headers.PRODUCER)
            if not self._is_replay(message):
                drop |= {headers.REPLAY, headers.REPLAY_FORCED}
        return headers.copy_of(message, extra, drop=drop)

    async def _transact(self, items: list[_Prepared], attempt: int | None = None) -> None:
        """Handle ``items`` in one transaction: inbox check, handlers, inbox rows, commit, ack.

        A database failure anywhere in it, or one a handler ran into, is raised as an
        :class:`InfrastructureError`; other handler errors are raised as they are.
        """
        outcomes: list[Literal["processed", "duplicate", "conflict"]] = []
        produced = 0
        from_handler: BaseException | None = None
        try:
            async with self._sessions() as session, session.begin():
                keys = {p.key for p in items}
                known: dict[str, str] = dict(
                    (
                        await session.exec(
                            select(InboxRow.key, InboxRow.payload_hash).where(
                                col(InboxRow.key).in_(keys)
                            )
                        )
                    ).all()
                )
                rows: list[dict[str, Any]] = []
                for p in items:
                    seen = known.get(p.key)
                    if seen is not None:
                        outcomes.append("duplicate" if seen == p.digest else "conflict")
                        continue
                    uow = UnitOfWork(session, self._source, sweeper=self._sweeper)
                    started = time.perf_counter()
                    try:
                        with self._scope(p, attempt):
                            await self._run_handler(p, uow)
                    except Exception as exc:
                        from_handler = exc
                        raise
                    p.duration = time.perf_counter() - started
                    produced += uow.outbox.added
                    known[p.key] = p.digest
                    rows.append(
                        {
                            "key": p.key,
                            "payload_hash": p.digest,
                            "event_id": p.event.id,
                            "event_type": p.event.type,
                            "processed_at": utcnow(),
                        }
                    )
                    outcomes.append("processed")
                if rows:
                    await session.exec(insert(InboxRow), params=rows)
        except Exception as exc:
            failure = as_infrastructure(exc, "database", connecting=exc is not from_handler)
            if failure is not None:
                raise failure from exc
            raise
        if produced:
            self._on_commit()
        if "conflict" not in outcomes and len(items) > 1 and self._covers_all_older(items):
            last = max(items, key=lambda p: p.message.delivery_tag or 0)
            await self._settle(last.message, last.message.ack(multiple=True), items)
            for p, outcome in zip(items, outcomes, strict=True):
                settled: Outcome = "duplicate" if outcome == "duplicate" else "processed"
                self._record(p.message, settled, p.event.id, p.event.type, p.ctx.is_replay, p)
            return
        for p, outcome in zip(items, outcomes, strict=True):
            if outcome == "conflict":
                await self._dead_letter(
                    p.message,
                    "idempotency_conflict",
                    f"key {p.key!r} was processed before with a different payload",
                    attempts=p.ctx.attempt,
                    prepared=p,
                )
            else:
                await self._ack(
                    p.message, outcome, p.event.id, p.event.type, p.ctx.is_replay, prepared=p
                )

    async def _run_handler(self, p: _Prepared, uow: UnitOfWork) -> None:
        limit = self._settings.handler_timeout_seconds
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                await p.sub.handler(p.event, uow)
        except TimeoutError:
            if deadline.expired():
                raise HandlerTimeout(f"handler took longer than {limit:g} s") from None
            raise

    async def _single(self, p: _Prepared) -> None:
        attempts = 0
        try:
            async for attempt in self._retrying.copy():
                with attempt:
                    attempts += 1
                    await self._transact([p], attempt=p.ctx.attempt + attempts - 1)
        except InfrastructureError:
            raise
        except Exception as exc:
            if _final(exc):  # a PermanentError, or data the database refuses
                await self._dead_letter(
                    p.message,
                    "handler_error",
                    _describe(exc),
                    attempts=p.ctx.attempt + attempts - 1,
                    prepared=p,
                    exception=type(exc).__name__,
                )
                return
            log.warning(
                "handler for %s on %s failed %d times: %s",
                p.event.type,
                self.queues.consumer,
                attempts,
                type(exc).__name__,
            )
            log.debug("handler failure of %s", p.event.id, exc_info=exc)
            await self._retry_later(p, exc, attempts)

    @contextmanager
    def _scope(self, p: _Prepared, attempt: int | None = None) -> Iterator[None]:
        carrier = {k: headers.text(v) for k, v in (p.message.headers or {}).items()}
        with (
            context.use(p.ctx if attempt is None else replace(p.ctx, attempt=attempt)),
            tracer.start_as_current_span(
                f"process {p.event.routing_key}",
                context=propagate.extract(carrier),
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": self.queues.work,
                    "messaging.consumer.group.name": self.queues.consumer,
                    "messaging.message.id": p.event.id,
                    "messaging.message.conversation_id": p.event.correlationid or "",
                    "cloudevents.event_type": p.event.type,
                },
            ),
        ):
            yield

    # -- settling --------------------------------------------------------------------------

    def _settled(self, message: AbstractIncomingMessage) -> bool:
        return id(message) not in self._unsettled

    def _covers_all_older(self, items: list[_Prepared]) -> bool:
        """Whether one multiple-ack for ``items`` would acknowledge nothing else."""
        entries = [self._unsettled.get(id(p.message)) for p in items]
        if any(e is None for e in entries):
            return False
        channel = entries[0][1]  # type: ignore[index]
        tags = {e[2] for e in entries if e is not None and e[1] is channel}
        if len(tags) != len(items):
            return False
        top = max(t or 0 for t in tags)
        return all(
            tag in tags
            for (_m, ch, tag) in self._unsettled.values()
            if ch is channel and tag <= top
        )

    async def _publish_copy(self, routing_key: str, exchange: str, copy: Message) -> None:
        """Publish a retry or DLQ copy, confirmed; a broker failure pauses consumption."""
        try:
            await self._publisher.publish(exchange, routing_key, copy)
        except Exception as exc:
            failure = as_infrastructure(exc, "broker")
            if failure is None:
                # headers the broker handed us that it will not take back (bytes, deep tables)
                copy.headers = headers.plain(copy.headers)
                try:
                    await self._publisher.publish(exchange, routing_key, copy)
                    return
                except Exception as again:
                    failure = as_infrastructure(again, "broker")
                    if failure is None:
                        raise
            raise failure from exc

    async def _retry_later(self, p: _Prepared, exc: BaseException, attempts: int) -> None:
        message = p.message
        retries = headers.int_header(message, headers.RETRIES)
        total = headers.int_header(message, headers.ATTEMPTS) + attempts
        if retries >= len(self.queues.retries):
            await self._dead_letter(
                message,
                "retries_exhausted",
                _describe(exc),
                attempts=total,
                prepared=p,
                exception=type(exc).__name__,
            )
            return
        copy = self._copy(
            message,
            {
                headers.RETRIES: retries + 1,
                headers.ATTEMPTS: total,
                headers.ERROR: _describe(exc),
                headers.EXCEPTION: type(exc).__name__,
                headers.CONSUMER: self.queues.consumer,
                headers.FIRST_FAILURE: headers.text(
                    headers.header(message, headers.FIRST_FAILURE) or headers.now_iso()
                ),
                headers.LAST_FAILURE: headers.now_iso(),
                headers.ROUTING_KEY: headers.original_routing_key(message),
            },
        )
        await self._publish_copy(self.queues.retries[retries], "", copy)
        # the log line names the exception's class (never its text) and the correlation id
        await self._ack(
            message,
            "retried",
            p.event.id,
            p.event.type,
            p.ctx.is_replay,
            type(exc).__name__,
            prepared=p,
        )

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        reason: DlqReason,
        detail: str,
        *,
        attempts: int,
        prepared: _Prepared | None = None,
        exception: str | None = None,
    ) -> None:
        """Copy the delivery into the DLQ (confirmed), announce it (``message.dead_lettered``
        in the outbox, committed), then ack it.

        In this order nothing is lost: a crash or an outage before the ack leaves the delivery
        with us or the broker, and it is dead-lettered again -- a second DLQ copy at worst,
        and the same announcement (its id and idempotency key are the consumer's, the
        reason's and the message's). A database that fails the announcement pauses the
        consumer like any outage, the delivery unacked.
        """
        moment = datetime.now(UTC)
        now = headers.iso(moment)
        extra: dict[str, Any] = {
            headers.REASON: reason,
            headers.ERROR: scrub_text(detail)[:1000],
            headers.CONSUMER: self.queues.consumer,
            headers.ATTEMPTS: attempts,
            headers.FIRST_FAILURE: headers.text(
                headers.header(message, headers.FIRST_FAILURE) or now
            ),
            headers.LAST_FAILURE: now,
            headers.ROUTING_KEY: headers.original_routing_key(message),
        }
        if exception is not None:
            extra[headers.EXCEPTION] = exception
        announcement = self._announcement(
            message,
            reason,
            detail,
            attempts=attempts,
            prepared=prepared,
            exception=exception,
            at=moment,
        )
        if announcement is not None:
            extra[headers.ANNOUNCEMENT] = announcement.event_id
        # confirmed in the DLQ before the original is acked: never lost in between
        await self._publish_copy(self.queues.dlq, self._names.dlx, self._copy(message, extra))
        if announcement is not None:
            await self._announce(message, announcement)
        event_id: str | None = message.message_id
        event_type: str | None = message.type
        replay = self._is_replay(message)
        if prepared is not None:
            event_id, event_type = prepared.event.id, prepared.event.type
        await self._ack(message, "dead_lettered", event_id, event_type, replay, reason)

    def _announcement(
        self,
        message: AbstractIncomingMessage,
        reason: DlqReason,
        detail: str,
        *,
        attempts: int,
        prepared: _Prepared | None,
        exception: str | None,
        at: datetime,
    ) -> _Announcement | None:
        """The ``message.dead_lettered`` event of a dead letter (see
        :mod:`tributary.messaging.deadletters`); None for a dead-lettered announcement (no
        loop) or if it cannot be built (logged: the dead letter matters more)."""
        routing_key = headers.original_routing_key(message)
        raw = None if prepared is not None else deadletters.body_object(message.body)
        message_type: object
        message_id: object
        correlation_id: object
        if prepared is not None:
            message_type = prepared.event.routing_key
            message_id = prepared.event.id
            correlation_id = prepared.event.correlationid
        else:
            message_type = deadletters.safe_routing_key(routing_key) or (
                raw.get("type") if raw else None
            )
            message_id = deadletters.safe_id(raw.get("id") if raw else None) or message.message_id
            correlation_id = raw.get("correlationid") if raw else None
        claimed = (routing_key, message_type, message.type, raw.get("type") if raw else None)
        types = {deadletters.safe_routing_key(name) for name in claimed}
        if any(t is not None and t.rpartition(".v")[0] == deadletters.DEAD_LETTERED for t in types):
            return None  # a dead-lettered announcement announces nothing: no loop
        try:
            payload = deadletters.announcement(
                service=self.service,
                consumer=self.queues.consumer,
                queue=self.queues.work,
                dlq=self.queues.dlq,
                reason=reason,
                detail=detail,
                attempts=attempts,
                body=message.body,
                message_type=message_type if isinstance(message_type, str) else None,
                message_id=message_id if isinstance(message_id, str) else None,
                correlation_id=correlation_id if isinstance(correlation_id, str) else None,
                exception=exception,
                at=at,
            )
            before = headers.header(message, headers.ANNOUNCED_BEFORE)
            key = deadletters.idempotency_key(
                self.queues.consumer,
                reason,
                payload.message_id,
                message.body,
                None if before is None else headers.text(before)[:200],
            )
        except Exception:
            log.exception("announcing a dead letter on %s failed", self.queues.work)
            return None
        return _Announcement(payload, key, deadletters.event_id(key))

    async def _announce(
        self, message: AbstractIncomingMessage, announcement: _Announcement
    ) -> None:
        """Commit the announcement of a dead letter in the outbox, in a transaction of its own.

        Raises only :class:`InfrastructureError` (the database failed: the caller must not
        ack). Any other failure is logged and leaves the dead letter as it is: the DLQ copy
        matters more than its announcement.
        """
        payload = announcement.payload
        ctx = context.MessageContext(
            correlation_id=payload.correlation_id,
            causation_id=payload.message_id,
            consumer=self.queues.consumer,
        )
        carrier = {k: headers.text(v) for k, v in (message.headers or {}).items()}
        try:
            with (
                context.use(ctx),
                tracer.start_as_current_span(
                    f"dead_letter {payload.message_type or 'message'}",
                    context=propagate.extract(carrier),
                    kind=SpanKind.INTERNAL,
                    attributes={
                        "messaging.system": "rabbitmq",
                        "messaging.destination.name": self.queues.work,
                        "messaging.consumer.group.name": self.queues.consumer,
                        "messaging.message.id": payload.message_id or "",
                        "tributary.dead_letter.reason": payload.reason,
                    },
                ),
            ):
                written = await self._write_announcement(announcement)
        except Exception as exc:
            failure = as_infrastructure(exc, "database", connecting=True)
            if failure is not None:
                raise failure from exc
            log.exception("announcing a dead letter on %s failed", self.queues.work)
            return
        if written:
            self._on_commit()

    async def _write_announcement(self, announcement: _Announcement) -> bool:
        """Stage the announcement unless a row with its id is already in the outbox."""
        event_id = announcement.event_id
        try:
            async with self._sessions() as session, session.begin():
                seen = await session.exec(
                    select(OutboxRow.seq).where(col(OutboxRow.event_id) == event_id)
                )
                if seen.first() is not None:
                    return False
                Outbox(session, self._source).add(
                    announcement.payload, idempotency_key=announcement.key, event_id=event_id
                )
        except sa_exc.IntegrityError as exc:
            if as_infrastructure(exc, "database") is not None:
                raise
            return False  # the same announcement, written by a concurrent dead-lettering
        return True

    async def _ack(
        self,
        message: AbstractIncomingMessage,
        outcome: Outcome,
        event_id: str | None,
        event_type: str | None,
        replay: bool,
        reason: str | None = None,
        prepared: _Prepared | None = None,
    ) -> None:
        await self._settle(message, message.ack())
        self._record(message, outcome, event_id, event_type, replay, prepared, reason)

    async def _requeue(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Hand a delivery back unprocessed (counts toward the queue's delivery limit)."""
        if self._settled(message):
            return
        await self._settle(message, message.nack(requeue=True))
        replay = self._is_replay(message)
        self._record(message, "requeued", message.message_id, message.type, replay, None, reason)

    def _record(
        self,
        message: AbstractIncomingMessage,
        outcome: Outcome,
        event_id: str | None,
        event_type: str | None,
        replay: bool,
        prepared: _Prepared | None = None,
        reason: str | None = None,
    ) -> None:
        """Tell the listeners (metrics, tests) and the log what became of a delivery."""
        record = OutcomeRecord(
            self.queues.consumer,
            event_id,
            event_type,
            outcome,
            reason,
            replay,
            duration=prepared.duration if prepared and outcome == "processed" else None,
            # the age when handling started: once per event handled, not at every retry
            backlog=prepared.backlog
            if prepared and outcome in ("processed", "duplicate")
            else None,
        )
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a listener must not undo a settled delivery
                log.exception("outcome listener failed on %s", self.queues.work)
        level = (
            logging.WARNING
            if outcome in ("retried", "dead_lettered", "requeued")
            else logging.DEBUG
        )
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s %s on %s%s",
                outcome,
                event_type,
                self.queues.consumer,
                f" ({reason})" if reason else "",
                extra={
                    "event_id": event_id,
                    "event_type": event_type,
                    "consumer": self.queues.consumer,
                    "outcome": outcome,
                    "reason": reason,
                    "attempt": prepared.ctx.attempt if prepared else None,
                    "correlation_id": prepared.event.correlationid if prepared else None,
                },
            )

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        op: Awaitable[None],
        group: list[_Prepared] | None = None,
    ) -> None:
        """Send an ack/nack; the deliveries it covers are settled whether or not it arrives."""
        for m in [p.message for p in group] if group else [message]:
            self._unsettled.pop(id(m), None)
        try:
            await op
        except Exception as exc:  # channel closed: the broker redelivers; the inbox dedupes
            log.warning("ack/nack not delivered: %s", exc)


def _final(exc: BaseException) -> bool:
    """Failures that retrying cannot fix: dead-letter at once (infrastructure pauses instead)."""
    return isinstance(exc, PermanentError | InfrastructureError) or data_failure(exc)


def _describe(exc: BaseException) -> str:
    return scrub_text(f"{type(exc).__name__}: {exc}")[:1000]
