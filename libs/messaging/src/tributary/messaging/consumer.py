"""The consumer runtime: parse, validate, upcast, dedupe (inbox), handle, commit, then ack.

Deliveries already waiting are handled together, up to ``batch_max`` in one transaction
(group commit); a failure in a batch replays it one message per transaction. Failures go
through in-process retries, delayed-retry queues and finally the DLQ. Nothing is acked before
it is processed, recorded as a duplicate, or confirmed by the broker in a retry queue or DLQ.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from tenacity import (
    AsyncRetrying,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from tributary.contracts.catalog import CatalogError, catalog
from tributary.contracts.envelope import CloudEvent, MalformedEvent, parse_event
from tributary.contracts.events import Payload
from tributary.contracts.pii import scrub_text
from tributary.contracts.upcasting import NoUpcastPath, upcast
from tributary.contracts.validation import SchemaViolation, validate
from tributary.messaging import context, headers
from tributary.messaging.db import InboxRow, session_factory, utcnow
from tributary.messaging.errors import DlqReason, PermanentError, Rejected
from tributary.messaging.publisher import Publisher
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names, QueueSet
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.messaging.consumer")
tracer = trace.get_tracer("tributary.messaging")

Handler = Callable[[CloudEvent[Any], UnitOfWork], Awaitable[None]]
_CLOSE_TIMEOUT = 5.0  # a broker that is gone must not hold up a shutdown
Outcome = Literal["processed", "duplicate", "retried", "dead_lettered"]
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
    ) -> None:
        self.service = service
        self.queues = queues
        self._subs = dict(subscriptions)
        self._sessions = session_factory(engine)
        self._publisher = publisher
        self._names = names
        self._settings = settings
        self._on_commit = on_commit
        self._listeners = listeners
        self._source = f"/services/{service}"
        self._pending: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._cautious = False
        self._stopping = False
        self._speedup: asyncio.Task[None] | None = None
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(settings.inprocess_retries),
            wait=wait_exponential_jitter(
                multiplier=settings.inprocess_backoff_seconds, max=2.0, jitter=0.05
            ),
            retry=retry_if_not_exception_type(PermanentError),
            reraise=True,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, connection: AbstractConnection) -> None:
        self._channel = await connection.channel()
        # ensure=True registers the queue with the robust channel: only then are it and its
        # consumer restored after a reconnect
        self._queue = await self._channel.get_queue(self.queues.work, ensure=True)
        self._workers = [
            asyncio.create_task(self._work(), name=f"{self.queues.work}-worker-{n}")
            for n in range(self._settings.concurrency)
        ]
        # Cautious start: one message at a time while the broker hands back redeliveries.
        # Every message a crashed consumer held is charged a delivery; taking them one by one
        # means a poison message that kills us again is charged alone, not with its neighbours.
        self._cautious = self._settings.prefetch > 1
        await self._channel.set_qos(prefetch_count=1 if self._cautious else self._settings.prefetch)
        self._tag = await self._queue.consume(self._on_message)

    async def _full_speed(self) -> None:
        """The first fresh delivery: re-subscribe with the configured prefetch."""
        if self._queue is None or self._channel is None or self._tag is None:
            return
        try:
            await self._queue.cancel(self._tag)
            await self._channel.set_qos(prefetch_count=self._settings.prefetch)
            self._tag = await self._queue.consume(self._on_message)
        except Exception as exc:  # closing or reconnecting: the robust channel re-consumes
            log.warning("raising prefetch on %s failed: %s", self.queues.work, exc)

    @property
    def running(self) -> bool:
        return (
            self._tag is not None
            and self._channel is not None
            and not self._channel.is_closed
            and all(not w.done() for w in self._workers)
        )

    async def stop(self) -> None:
        """Finish the batches in hand and ack them, then stop consuming and close.

        Deliveries not yet started are left unacked: closing the channel hands them back.
        (Acks sent just before a quorum queue's channel closes can be lost by RabbitMQ 3.x; the
        acks go out before the cancel and the close, and the inbox absorbs any redelivery.)
        """
        self._stopping = True
        if self._speedup is not None:
            await asyncio.gather(self._speedup, return_exceptions=True)
        while not self._pending.empty():
            self._pending.get_nowait()
        for _ in self._workers:
            self._pending.put_nowait(None)
        if self._workers:
            _done, late = await asyncio.wait(
                self._workers, timeout=self._settings.shutdown_grace_seconds
            )
            for task in late:
                task.cancel()
        if self._queue is not None and self._tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(self._tag), _CLOSE_TIMEOUT)
            except Exception as exc:  # channel already gone: the broker requeues for us
                log.debug("cancel of %s failed: %s", self.queues.work, exc)
            self._tag = None
        if self._channel is not None and not self._channel.is_closed:
            try:
                await asyncio.wait_for(self._channel.close(), _CLOSE_TIMEOUT)
            except Exception as exc:  # broker unreachable: nothing left to hand back
                log.debug("closing the channel of %s failed: %s", self.queues.work, exc)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            return  # left unacked: the channel's close hands it back to the broker
        self._pending.put_nowait(message)
        if self._cautious and not message.redelivered:
            self._cautious = False
            self._speedup = asyncio.create_task(self._full_speed())

    async def _work(self) -> None:
        while True:
            first = await self._pending.get()
            if first is None:
                return
            batch = [first]
            # never wait to fill a batch: take only what is already here
            while len(batch) < self._settings.batch_max and not self._pending.empty():
                nxt = self._pending.get_nowait()
                if nxt is None:
                    self._pending.put_nowait(None)
                    break
                batch.append(nxt)
            try:
                await self.handle(batch)
            except Exception:
                # broker or database gone mid-way: unacked deliveries come back after recovery
                log.exception("batch of %d on %s not settled", len(batch), self.queues.work)

    # -- one batch ---------------------------------------------------------------------------

    async def handle(self, batch: list[AbstractIncomingMessage]) -> None:
        prepared: list[_Prepared] = []
        for message in batch:
            try:
                prepared.append(self._prepare(message))
            except Rejected as rejected:
                await self._dead_letter(message, rejected.reason, rejected.detail, attempts=0)
        groupable = [p for p in prepared if not p.sub.irreversible]
        one_by_one = prepared
        if len(groupable) > 1 and self._settings.batch_max > 1:
            # one worker settles its batches in delivery order, so when the group is the whole
            # batch every older delivery on the channel is settled: one multiple-ack will do
            whole = self._settings.concurrency == 1 and len(groupable) == len(batch)
            try:
                await self._transact(groupable, ack_together=whole)
                one_by_one = [p for p in prepared if p.sub.irreversible]
            except Exception as exc:
                log.info(
                    "batch of %d on %s failed (%s): handling one per transaction",
                    len(groupable),
                    self.queues.work,
                    type(exc).__name__,
                )
        for p in one_by_one:
            await self._single(p)

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
        try:
            validate(spec.routing_key, event.data, "tolerant")
        except SchemaViolation as exc:
            raise Rejected("schema_invalid", str(exc)) from None
        data = event.data
        if spec.version != sub.payload_type.version:
            try:
                data = upcast(spec.type, spec.version, data, sub.payload_type.version)
            except NoUpcastPath as exc:
                raise Rejected("unknown_type", str(exc)) from None
        try:
            payload = sub.payload_type.model_validate(data)
        except ValidationError as exc:
            first = exc.errors(include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise Rejected("schema_invalid", f"data.{where}: {first['msg']}") from None
        return _Prepared(
            backlog=max(0.0, time.time() - event.time.timestamp()),
            message=message,
            event=event.model_copy(update={"data": payload}),
            sub=sub,
            key=event.inbox_key,
            digest=payload_hash(data),
            ctx=context.MessageContext(
                correlation_id=event.correlationid,
                causation_id=event.id,
                event_id=event.id,
                event_type=event.type,
                consumer=self.queues.consumer,
                attempt=headers.int_header(message, headers.ATTEMPTS) + 1,
                is_replay=headers.is_replay(message),
                replay_forced=headers.is_forced_replay(message),
            ),
        )

    async def _transact(
        self, items: list[_Prepared], attempt: int | None = None, *, ack_together: bool = False
    ) -> None:
        """Handle ``items`` in one transaction: inbox check, handlers, inbox rows, commit, ack."""
        outcomes: list[Literal["processed", "duplicate", "conflict"]] = []
        produced = 0
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
                uow = UnitOfWork(session, self._source)
                started = time.perf_counter()
                with self._scope(p, attempt):
                    await p.sub.handler(p.event, uow)
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
        if produced:
            self._on_commit()
        if ack_together and "conflict" not in outcomes:
            last = max(items, key=lambda p: p.message.delivery_tag or 0)
            await self._settle(last.message.ack(multiple=True))
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

    async def _single(self, p: _Prepared) -> None:
        attempts = 0
        try:
            async for attempt in self._retrying.copy():
                with attempt:
                    attempts += 1
                    await self._transact([p], attempt=p.ctx.attempt + attempts - 1)
        except PermanentError as exc:
            await self._dead_letter(
                p.message,
                "handler_error",
                _describe(exc),
                attempts=p.ctx.attempt + attempts - 1,
                prepared=p,
            )
        except Exception as exc:
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

    async def _retry_later(self, p: _Prepared, exc: BaseException, attempts: int) -> None:
        message = p.message
        retries = headers.int_header(message, headers.RETRIES)
        total = headers.int_header(message, headers.ATTEMPTS) + attempts
        if retries >= len(self.queues.retries):
            await self._dead_letter(
                message, "retries_exhausted", _describe(exc), attempts=total, prepared=p
            )
            return
        copy = headers.copy_of(
            message,
            {
                headers.RETRIES: retries + 1,
                headers.ATTEMPTS: total,
                headers.ERROR: _describe(exc),
                headers.CONSUMER: self.queues.consumer,
                headers.FIRST_FAILURE: headers.text(
                    headers.header(message, headers.FIRST_FAILURE) or headers.now_iso()
                ),
                headers.LAST_FAILURE: headers.now_iso(),
                headers.ROUTING_KEY: headers.original_routing_key(message),
            },
        )
        await self._publisher.publish("", self.queues.retries[retries], copy)
        await self._ack(message, "retried", p.event.id, p.event.type, p.ctx.is_replay)

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        reason: DlqReason,
        detail: str,
        *,
        attempts: int,
        prepared: _Prepared | None = None,
    ) -> None:
        now = headers.now_iso()
        copy = headers.copy_of(
            message,
            {
                headers.REASON: reason,
                headers.ERROR: scrub_text(detail)[:1000],
                headers.CONSUMER: self.queues.consumer,
                headers.ATTEMPTS: attempts,
                headers.FIRST_FAILURE: headers.text(
                    headers.header(message, headers.FIRST_FAILURE) or now
                ),
                headers.LAST_FAILURE: now,
                headers.ROUTING_KEY: headers.original_routing_key(message),
            },
        )
        # confirmed in the DLQ before the original is acked: never lost in between
        await self._publisher.publish(self._names.dlx, self.queues.dlq, copy)
        event_id: str | None = message.message_id
        event_type: str | None = message.type
        replay = headers.is_replay(message)
        if prepared is not None:
            event_id, event_type = prepared.event.id, prepared.event.type
        await self._ack(message, "dead_lettered", event_id, event_type, replay, reason)

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
        await self._settle(message.ack())
        self._record(message, outcome, event_id, event_type, replay, prepared, reason)

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
            backlog=prepared.backlog if prepared else None,
        )
        for listener in self._listeners:
            listener(record)
        level = logging.WARNING if outcome in ("retried", "dead_lettered") else logging.DEBUG
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

    @staticmethod
    async def _settle(op: Awaitable[None]) -> None:
        try:
            await op
        except Exception as exc:  # channel closed: the broker redelivers; the inbox dedupes
            log.warning("ack/nack not delivered: %s", exc)


def _describe(exc: BaseException) -> str:
    return scrub_text(f"{type(exc).__name__}: {exc}")[:1000]
