"""Erasing one person from the runtime's own stores: the outbox and the dead-letter queues.

Personal data does not only live in a service's domain tables. The outbox keeps every event a
service published for the replay window (body bytes), and a dead-letter queue keeps failed
messages until an operator acts. Erasure therefore **purges by person**: it finds the records
that mention the person -- their user id, or a string given for them such as an address -- and
deletes them.

Crypto-shredding (encrypting each person's data with a key of their own and deleting the key)
was not chosen: every consumer would need the per-person keys, which only identity could hand
out, so services would have to call identity (or share a key store) to read an event, which
breaks "services talk only through events"; and events already published in clear would still
need purging.

What matches (:class:`PersonMatcher`): the user id or a given string standing on its own, not
as part of a longer word or address (``ada@example.com`` does not match ``bada@example.com``),
in any letter case, as it appears in the raw bytes or JSON-escaped. Strings shorter than
:data:`MIN_LENGTH` are refused: a short fragment would take other people's records with it.

What never matches: records of ``user.erased`` itself. The erasure event carries no personal
data, and it must still be published (outbox) or replayed (DLQ).

The inbox needs nothing: its rows hold an idempotency key (made of event types and ids), a
SHA-256 of the payload, the event id and its type. They also keep a redelivered event about
the person from running its handler again.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity
from sqlalchemy import Boolean, Column, DateTime, String, bindparam, delete, not_, or_
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.catalog import NAMESPACE
from tributary.messaging import headers as h
from tributary.messaging.db import OutboxRow, utcnow
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.faults import as_infrastructure, brief
from tributary.messaging.publisher import Publisher

ERASURE_TYPE = "user.erased"
"""Records of this event type are never purged: the erasure itself must go out."""
MIN_LENGTH = 6
"""Shortest string accepted for matching (an address is at least ``a@b.cd``)."""
DEFAULT_CHUNK = 1000
GET_TIMEOUT = 10.0

# a match must stand on its own: no letter, digit or address character right before or after
# it (a dot after it is allowed when no word follows: the end of a sentence)
_BEFORE = r"(?<![\w.%+\-])"
_AFTER = r"(?![\w%+\-]|\.\w)"


class DeadLetterQueueMissing(LookupError):
    """The queue to sweep does not exist."""


def _variants(text: str) -> set[str]:
    """``text`` as it may appear in a record: raw, lower case, JSON-escaped (either way)."""
    forms: set[str] = set()
    for value in {text, text.lower()}:
        forms.add(value)
        forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
        forms.add(json.dumps(value, ensure_ascii=True)[1:-1])
    return forms


class PersonMatcher:
    """Whether a record mentions one person: their user id or one of the ``also`` strings."""

    def __init__(self, user_id: str, also: Iterable[str] = ()) -> None:
        texts = [user_id.strip(), *(s.strip() for s in also)]
        short = [t for t in texts if len(t) < MIN_LENGTH]
        if short:
            raise ValueError(
                f"erasure needs strings of at least {MIN_LENGTH} characters; "
                f"{len(short)} shorter one(s) would match other people's records"
            )
        self.user_id = texts[0]
        self.texts: tuple[str, ...] = tuple(dict.fromkeys(texts))
        forms = sorted({v for t in self.texts for v in _variants(t)}, key=len, reverse=True)
        self._pattern = re.compile(
            _BEFORE + "(?:" + "|".join(re.escape(f) for f in forms) + ")" + _AFTER,
            re.IGNORECASE,
        )
        self.needles: tuple[bytes, ...] = tuple(sorted({f.encode() for f in forms}))
        """Byte strings a record mentioning the person contains (a superset filter for SQL)."""

    def in_text(self, text: str) -> bool:
        return self._pattern.search(text) is not None

    def in_bytes(self, data: bytes) -> bool:
        return self.in_text(data.decode("utf-8", errors="replace"))

    def in_value(self, value: Any) -> bool:
        """Any AMQP field value or JSON value: tables, arrays, bytes, text, numbers."""
        if value is None or isinstance(value, bool | int | float):
            return False
        if isinstance(value, bytes | bytearray | memoryview):
            return self.in_bytes(bytes(value))
        if isinstance(value, Mapping):
            return any(self.in_text(str(k)) or self.in_value(v) for k, v in value.items())
        if isinstance(value, list | tuple | set | frozenset):
            return any(self.in_value(v) for v in value)
        return self.in_text(str(value))

    def in_message(self, message: AbstractIncomingMessage) -> bool:
        """The body, any header or any text property mentions the person."""
        properties = (
            message.message_id,
            message.correlation_id,
            message.reply_to,
            message.type,
            message.app_id,
            message.user_id,
        )
        return (
            self.in_bytes(message.body)
            or self.in_value(dict(message.headers or {}))
            or any(self.in_value(p) for p in properties)
        )


def is_erasure_type(routing_key_or_type: str | None) -> bool:
    """``user.erased.v1`` or ``com.tributary.user.erased.v1``."""
    name = (routing_key_or_type or "").removeprefix(f"{NAMESPACE}.")
    return name.startswith(f"{ERASURE_TYPE}.")


def is_erasure_message(message: AbstractIncomingMessage) -> bool:
    return is_erasure_type(message.type) or is_erasure_type(h.original_routing_key(message))


# -- who was erased ---------------------------------------------------------------------------


class ErasedUser(SQLModel, table=True):
    """A user this service has erased: the user id only, kept so that events about them that
    arrive late (reordered, retried, replayed) do not bring their data back.

    Not one of the runtime's own tables: a service that needs it creates it in a migration.
    """

    __tablename__ = "tributary_erased_users"

    user_id: str = Field(primary_key=True, max_length=60)
    erased_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(), nullable=False)
    )


async def remember_erased(session: AsyncSession, user_id: str) -> None:
    """Record ``user_id`` as erased (idempotent), in ``session``'s transaction."""
    if await session.get(ErasedUser, user_id) is None:
        session.add(ErasedUser(user_id=user_id))
        await session.flush()


async def was_erased(session: AsyncSession, user_id: str | None) -> bool:
    """Whether ``user_id`` was erased here: handlers drop events about such a user."""
    return user_id is not None and await session.get(ErasedUser, user_id) is not None


# -- the outbox -------------------------------------------------------------------------------


class _FoldedContains(FunctionElement[bool]):
    """The body, ASCII letters folded to lower case, contains ``needle`` (prepared for the
    dialect by :func:`_folded_needle`): ``instr(lower(body), …)`` on SQLite, and on PostgreSQL
    ``position(… in lower(encode(body, 'escape')))``, which needs no valid UTF-8."""

    type = Boolean()
    inherit_cache = True
    name = "folded_contains"


@compiles(_FoldedContains)
def _instr(element: _FoldedContains, compiler: SQLCompiler, **kw: Any) -> str:
    body, needle = (compiler.process(c, **kw) for c in element.clauses)
    return f"(instr(lower({body}), {needle}) > 0)"


@compiles(_FoldedContains, "postgresql")
def _position(element: _FoldedContains, compiler: SQLCompiler, **kw: Any) -> str:
    body, needle = (compiler.process(c, **kw) for c in element.clauses)
    return f"(position({needle} in lower(encode({body}, 'escape'))) > 0)"


def _pg_escape(data: bytes) -> str:
    """``data`` as PostgreSQL's ``encode(…, 'escape')`` shows it."""
    out = []
    for byte in data:
        if byte == 0x5C:
            out.append("\\\\")
        elif byte == 0 or byte >= 0x80:
            out.append(f"\\{byte:03o}")
        else:
            out.append(chr(byte))
    return "".join(out)


def _folded_needle(needle: bytes, dialect: str) -> str:
    folded = needle.lower()  # ASCII only, as SQL's lower() on these values
    return _pg_escape(folded) if dialect == "postgresql" else folded.decode()


def _mentions(matcher: PersonMatcher, dialect: str) -> ColumnElement[bool]:
    body = col(OutboxRow.body)
    needles = sorted({_folded_needle(n, dialect) for n in matcher.needles})
    return or_(*(_FoldedContains(body, bindparam(None, n, type_=String())) for n in needles))


async def purge_outbox(
    session: AsyncSession, matcher: PersonMatcher, *, chunk: int = DEFAULT_CHUNK
) -> int:
    """Delete the outbox rows (published or not, parked too) whose body mentions the person,
    except ``user.erased`` rows; in ``session``'s transaction, ``chunk`` rows per statement.

    The database narrows the rows down by a search ignoring ASCII letter case; each
    candidate's body is then checked
    with :meth:`PersonMatcher.in_bytes` before it is deleted. Returns how many were deleted.
    """
    erasure = col(OutboxRow.routing_key).like(f"{ERASURE_TYPE}.%")
    mentions = _mentions(matcher, session.get_bind().dialect.name)
    after, total = -1, 0
    while True:
        rows = (
            await session.exec(
                select(OutboxRow.seq, OutboxRow.body)
                .where(col(OutboxRow.seq) > after, not_(erasure), mentions)
                .order_by(col(OutboxRow.seq))
                .limit(chunk)
            )
        ).all()
        doomed = [seq for seq, body in rows if seq is not None and matcher.in_bytes(body)]
        if doomed:
            await session.exec(delete(OutboxRow).where(col(OutboxRow.seq).in_(doomed)))
            total += len(doomed)
        if len(rows) < chunk:
            return total
        after = int(rows[-1][0] or 0)


# -- dead-letter queues -------------------------------------------------------------------------


@dataclass
class SweepCounts:
    """What a sweep did to one queue (or, added up, to several)."""

    scanned: int = 0
    removed: int = 0
    """Messages about the person, acknowledged away for good."""
    kept: int = 0
    """Other messages, put back (a confirmed copy at the tail, then the original acked)."""

    def __iadd__(self, other: SweepCounts) -> SweepCounts:
        self.scanned += other.scanned
        self.removed += other.removed
        self.kept += other.kept
        return self


Sweeper = Callable[[PersonMatcher], Awaitable[SweepCounts]]
"""Sweeps the dead-letter queues of one service for a person (the bus provides one)."""


def _encodable(value: Any) -> Any:
    """A header value as it came, in a form the client library encodes back: byte strings
    (a byte array, or a long string that was not UTF-8) as byte arrays."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return value


@dataclass(frozen=True)
class Provenance:
    """How the service's sender check names producers (see :func:`h.producer_of`)."""

    prefix: str
    trusted: Mapping[str, str | None]


def kept_copy(
    message: AbstractIncomingMessage, provenance: Provenance | None = None
) -> aio_pika.Message:
    """The message as it was: body, properties and every header, ``x-death`` included (it
    tells why the broker dead-lettered it); only the broker's per-delivery count is left out.
    ``user_id`` is left out too: the broker refuses one that is not the publishing user.

    With ``provenance`` (the sender check is on), the copy names the message's producer, as
    the service publishes it now: the broker's dead letters keep the producer's user id, and
    a producer header put in by another sender is not vouched for."""
    headers = {
        k: _encodable(v) for k, v in (message.headers or {}).items() if k != "x-delivery-count"
    }
    if provenance is not None:
        headers.pop(h.PRODUCER, None)
        producer = h.producer_of(message, prefix=provenance.prefix, trusted=provenance.trusted)
        if producer is not None:
            headers[h.PRODUCER] = producer
    return h.with_headers(message, headers)


async def _put_back(
    publisher: Publisher,
    queue: str,
    message: AbstractIncomingMessage,
    provenance: Provenance | None = None,
) -> None:
    copy = kept_copy(message, provenance)
    try:
        await publisher.publish("", queue, copy)
    except Exception as exc:
        if as_infrastructure(exc, "broker") is not None:
            raise
        # header values the client library cannot encode back (as the consumer does)
        copy.headers = h.plain(copy.headers)
        await publisher.publish("", queue, copy)


def _outage(exc: BaseException) -> InfrastructureError | None:
    """``exc`` as a broker outage, or None: a closed channel (an ack after the connection
    dropped) counts, as for the publisher."""
    if isinstance(exc, ChannelInvalidStateError):
        return InfrastructureError("broker", brief(exc))
    return as_infrastructure(exc, "broker")


async def sweep_queue(
    connection: AbstractConnection,
    publisher: Publisher,
    queue: str,
    matcher: PersonMatcher,
    *,
    batch: int = 100,
    provenance: Provenance | None = None,
) -> SweepCounts:
    """Remove from ``queue`` every message that mentions the person; put the others back.

    Reads with ``basic.get`` and manual acks, at most as many messages as the queue held at the
    first read (copies put back are not read again). A message about the person is acked
    away; any other is published again to the queue (default exchange, confirmed) and only
    then acked, so a failure at any point loses nothing: what was not acked is requeued by the
    broker when the channel closes, and the worst case is a kept message twice. ``user.erased``
    messages are always kept. Returns once the channel closed cleanly (every ack reached the
    broker); a broker failure raises :class:`InfrastructureError` and the sweep is run again.
    Raises :class:`DeadLetterQueueMissing` when ``queue`` does not exist.
    """
    # a broker failure becomes an InfrastructureError (the delivery is kept and handled
    # again); anything else, a bug, is raised as it is (the retry tiers, then the DLQ: visible)
    counts = SweepCounts()
    try:
        channel = await connection.channel(publisher_confirms=False)
    except Exception as exc:
        if (failure := _outage(exc)) is None:
            raise
        raise failure from exc
    try:
        try:
            source = await channel.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            raise DeadLetterQueueMissing(f"queue {queue!r} does not exist") from None
        total: int | None = None
        while total is None or counts.scanned < total:
            held: list[AbstractIncomingMessage] = []
            while len(held) < batch and (total is None or counts.scanned + len(held) < total):
                message = await source.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
                if message is None:  # empty, or another reader holds the rest
                    total = counts.scanned + len(held)
                    break
                if total is None:  # get-ok counts the messages behind this one
                    total = int(message.message_count or 0) + 1
                held.append(message)
            if not held:
                break
            drop = [m for m in held if not is_erasure_message(m) and matcher.in_message(m)]
            keep = [m for m in held if m not in drop]
            results = await asyncio.gather(
                *(_put_back(publisher, queue, m, provenance) for m in keep), return_exceptions=True
            )
            for message in drop:
                await message.ack()
            done = [m for m, r in zip(keep, results, strict=True) if r is None]
            for message in done:
                await message.ack()
            counts.scanned += len(held)
            counts.removed += len(drop)
            counts.kept += len(done)
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
    except (DeadLetterQueueMissing, InfrastructureError):
        raise
    except Exception as exc:
        if (failure := _outage(exc)) is None:
            raise
        raise failure from exc
    finally:
        # a clean close means the broker has taken every ack sent before it; unacked
        # messages go back to the queue
        if not channel.is_closed:
            try:
                await channel.close()
            except Exception as exc:
                raise InfrastructureError(
                    "broker", f"closing the sweep of {queue}: {brief(exc)}"
                ) from exc
    return counts
