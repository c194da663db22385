"""Telling an outage from a bad message.

A failure of the service's database or of the broker says nothing about the message being
handled: retrying it through the tiers would dead-letter a healthy backlog during an outage.
Such failures become :class:`InfrastructureError`, which pauses consumption instead.
"""

from __future__ import annotations

from typing import Literal

import aiormq.exceptions
from aio_pika.exceptions import AMQPError
from sqlalchemy import exc as sa

from tributary.contracts.pii import scrub_text
from tributary.messaging.errors import HandlerTimeout, InfrastructureError, Unroutable

# SQLSTATE classes that belong to the server, not to the statement: connection exception,
# insufficient resources, operator intervention (shutdown, cannot connect now), system error
_PG_CLASSES = ("08", "53", "57", "58")
_PG_STATES = ("25006",)  # read_only_sql_transaction: a standby or a read-only database
# SQLite errors that say the file cannot be written or reached (others are SQL bugs)
_SQLITE_MESSAGES = (
    "readonly database",
    "read-only",
    "unable to open database",
    "disk i/o error",
    "database or disk is full",
    "database is locked",
    "locking protocol",
)


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def database_failure(exc: BaseException, *, connecting: bool = False) -> bool:
    """Whether ``exc`` says the database is unreachable, read-only or failing.

    ``connecting``: the exception came from the runtime's own statements (opening the
    transaction, the inbox, the commit), where an ``OSError`` or a timeout can only be the
    database; from a handler an ``OSError`` may be its own SMTP or HTTP call.
    """
    if isinstance(exc, HandlerTimeout):
        return False
    if isinstance(exc, sa.TimeoutError | sa.DisconnectionError):
        return True
    if isinstance(exc, sa.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa.InterfaceError):
            return True
        if (state := _sqlstate(exc)) is not None:
            return state.startswith(_PG_CLASSES) or state in _PG_STATES
        text = str(exc.orig).lower()
        return isinstance(exc, sa.OperationalError) and any(m in text for m in _SQLITE_MESSAGES)
    if connecting and isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    # asyncpg errors that escape SQLAlchemy's wrapping (connection set-up)
    module = type(exc).__module__
    return module.startswith("asyncpg") and (
        "Connection" in type(exc).__name__ or "CannotConnectNow" in type(exc).__name__
    )


def data_failure(exc: BaseException) -> bool:
    """The database refused the message's own data (SQLSTATE class 22: a NUL in a string, a
    value out of range): retrying cannot help, so it is a permanent failure of the message."""
    state = _sqlstate(exc) if isinstance(exc, sa.DBAPIError) else None
    return state is not None and state.startswith("22")


def broker_failure(exc: BaseException) -> bool:
    """Whether ``exc`` from a publish says the broker refused, timed out or went away."""
    return isinstance(
        exc, AMQPError | aiormq.exceptions.AMQPError | OSError | TimeoutError | Unroutable
    )


def brief(exc: BaseException) -> str:
    """Type and first line of the error, masked: never SQL parameters or addresses."""
    source = getattr(exc, "orig", None) if isinstance(exc, sa.DBAPIError) else exc
    first = str(source if source is not None else exc).strip().splitlines()
    return scrub_text(f"{type(exc).__name__}: {first[0] if first else ''}")[:300]


def as_infrastructure(
    exc: BaseException, component: Literal["database", "broker"], *, connecting: bool = False
) -> InfrastructureError | None:
    """``exc`` as an :class:`InfrastructureError` of ``component``, or None if it is not one."""
    if isinstance(exc, InfrastructureError):
        return exc
    failed = (
        database_failure(exc, connecting=connecting)
        if component == "database"
        else broker_failure(exc)
    )
    if not failed:
        return None
    return InfrastructureError(component, brief(exc))
