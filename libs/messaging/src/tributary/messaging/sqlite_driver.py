"""SQLite through aiosqlite with one thread round trip per statement instead of four.

aiosqlite runs each connection's ``sqlite3`` calls on a worker thread of its own, and every call
is a round trip: the event loop queues it, the thread runs it and wakes the loop with the
result. SQLAlchemy's adapter makes four such calls for a query (``cursor()``, ``execute``,
``fetchall``, ``close``) and three for a write. The hand-offs and the loop wake-ups were about
two thirds of every service's CPU on SQLite (``bench/RESULTS.md``, "Sign-up flow").

This adapter keeps aiosqlite's thread, so every ``sqlite3`` call still runs on the connection's
own thread, in order, and a busy database still waits off the event loop. It only changes what
one round trip does: open a cursor, execute, fetch every row, read ``rowcount`` and
``lastrowid``, and close the cursor, all in one call. SQLAlchemy's adapter buffers every row of
a non-streaming result anyway, so nothing is read earlier than before. Commit stays one round trip,
and so does a rollback with a transaction open (the pool's rollback of a connection it takes
back after a commit makes none); server-side (streaming) cursors are aiosqlite's own, unchanged.

**Writers queue in the event loop.** SQLite lets one transaction write at a time; a second
writer waits in SQLite's busy handler, which sleeps and retries (up to 100 ms a try), so under
load writers slept while the lock was already free (identity's POST p99 of ~2 s in the sign-up
profile). Here the writers of one database file in one process take an ``asyncio.Lock`` before
the statement that starts their write transaction (the first ``INSERT``/``UPDATE``/``DELETE``/
``REPLACE``, where ``sqlite3`` opens it) and give it back when the transaction ends (commit,
rollback, close): they queue and are woken in order the moment it is free, as SQLite's lock
would let them in. Readers never take it (WAL readers do not block). Waiting longer than the
busy timeout raises "database is locked", as SQLite would. Writers in other processes still meet
SQLite's own lock and busy handler.

:func:`tributary.messaging.db.create_engine` uses it for every ``sqlite+aiosqlite`` URL.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import sqlite3
import weakref
from collections.abc import Sequence
from typing import Any

import aiosqlite
from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_connection
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util.concurrency import await_

BUSY_TIMEOUT = 30.0
"""Seconds a writer waits for the queue before "database is locked" (SQLite's busy timeout)."""

_OPENS_WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)
"""The statements before which ``sqlite3`` opens a transaction (its legacy, default mode)."""

_WRITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def writer_lock(database: str) -> asyncio.Lock:
    """The queue of writers of ``database`` in this process (and event loop)."""
    locks = _WRITERS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(database, asyncio.Lock())


def _file_of(args: tuple[Any, ...], kw: dict[str, Any]) -> str | None:
    """The database file a connection opens, or None for a private in-memory database."""
    database = str(args[0] if args else kw.get("database", ""))
    if not database or database == ":memory:" or "mode=memory" in database:
        return None
    return database if database.startswith("file:") else os.path.realpath(database)


_Outcome = tuple[Any, list[Any] | None, int, int | None]
"""What one round trip brings back: description, rows (``None`` without a result), rowcount and
lastrowid."""


def _run(connection: sqlite3.Connection, operation: str, parameters: Any, many: bool) -> _Outcome:
    """On the connection's thread: the whole life of one cursor."""
    cursor = connection.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else None
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """A buffered cursor whose every statement is one round trip to the connection's thread."""

    __slots__ = ("_arraysize", "_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: AsyncAdapt_dbapi_connection) -> None:
        # no aiosqlite cursor: each statement opens and closes a sqlite3 cursor of its own
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int:
        return self._lastrowid  # type: ignore[return-value]  # DB-API: None before an INSERT

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _round_trip(self, operation: str, parameters: Any, many: bool) -> None:
        adapted: Any = self._adapt_connection
        if adapted._database is not None and _OPENS_WRITE.match(operation):
            await adapted.enter_writers()
        async with self._adapt_connection._execute_mutex:
            connection: Any = self._connection
            outcome: _Outcome = await connection._execute(
                _run, connection._conn, operation, parameters, many
            )
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows = collections.deque(rows or ())

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        try:
            await_(self._round_trip(operation, parameters, False))
        except Exception as error:
            self._adapt_connection._handle_exception(error)

    def executemany(self, operation: Any, seq_of_parameters: Sequence[Any]) -> Any:
        try:
            await_(self._round_trip(operation, seq_of_parameters, True))
        except Exception as error:
            self._adapt_connection._handle_exception(error)

    async def _async_soft_close(self) -> None:
        """Nothing stays open on the thread: the rows are here already."""

    def close(self) -> None:
        self._rows.clear()

    def nextset(self) -> None:
        self._rows.clear()


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ("_database", "_writing")
    _cursor_cls = OneTripCursor

    def __init__(self, dbapi: Any, connection: Any, database: str | None) -> None:
        super().__init__(dbapi, connection)
        self._database = database
        self._writing: asyncio.Lock | None = None
        """The writers' lock while this connection's write transaction holds it."""

    async def enter_writers(self) -> None:
        """Queue for the database's write lock, unless this transaction holds it already."""
        if self._writing is not None or self._database is None:
            return
        lock = writer_lock(self._database)
        try:
            async with asyncio.timeout(BUSY_TIMEOUT):
                await lock.acquire()
        except TimeoutError:
            raise sqlite3.OperationalError("database is locked") from None
        self._writing = lock

    def _leave_writers(self) -> None:
        lock, self._writing = self._writing, None
        if lock is not None:
            lock.release()

    def _in_transaction(self) -> bool:
        connection: Any = self._connection
        return connection._connection is not None and connection._connection.in_transaction

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            if not self._in_transaction():
                self._leave_writers()

    def rollback(self) -> None:
        """The pool rolls back every connection it takes back; with no transaction open (it
        committed) there is nothing to undo, and no round trip is made for it. Reading
        ``in_transaction`` is safe here: nothing else runs on the connection between awaits."""
        try:
            if self._in_transaction():
                super().rollback()
        finally:
            if not self._in_transaction():
                self._leave_writers()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._leave_writers()

    def terminate(self) -> None:
        try:
            super().terminate()
        finally:
            self._leave_writers()


class OneTripDbapi(AsyncAdapt_aiosqlite_dbapi):
    """The DBAPI module the engine is given (``create_async_engine(..., module=...)``)."""

    def connect(self, *arg: Any, **kw: Any) -> OneTripConnection:
        creator_fn = kw.pop("async_creator_fn", None)
        database = _file_of(arg, kw)
        connection = creator_fn(*arg, **kw) if creator_fn else aiosqlite.connect(*arg, **kw)
        if not creator_fn:
            connection._thread.daemon = True  # as SQLAlchemy's adapter does
        return OneTripConnection(self, await_(connection), database)


def dbapi() -> OneTripDbapi:
    return OneTripDbapi(aiosqlite, sqlite3)
