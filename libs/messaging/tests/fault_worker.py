"""A consumer process that the fault tests start, crash, kill and stop.

    python fault_worker.py --db URL --broker URL --prefix P --service S --mode ok|crash|slow|hang

It consumes ``user.created`` into the table ``fault_things``, prints ``READY`` once it
consumes, and on SIGTERM stops the bus gracefully and exits 0. ``crash`` kills the process
(no cleanup at all) on a user id starting with :data:`CRASH_MARKER`; ``slow`` spends
``--delay-ms`` in each handler, so that a signal finds a batch in hand; ``hang`` never returns
for a user id starting with :data:`HANG_MARKER` (the handler timeout has to end it).

Run as ``fault_worker.py --standby`` it imports everything, then waits for its command line
(a JSON list) on stdin, and stops when stdin closes: tests keep processes warm, so that a
restart costs what it costs in production rather than the imports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Field, SQLModel

from tributary.contracts.envelope import CloudEvent
from tributary.contracts.events import UserCreatedV2
from tributary.messaging.bus import Bus
from tributary.messaging.consumer import Handler
from tributary.messaging.db import create_engine, create_runtime_tables
from tributary.messaging.testing import isolated_settings
from tributary.messaging.uow import UnitOfWork

CRASH_MARKER = "usr_crash"
HANG_MARKER = "usr_hang"
READY = "READY"
STANDBY = "--standby"


class FaultThing(SQLModel, table=True):
    """One row per handled event: a second insert of the same event would fail."""

    __tablename__ = "fault_things"

    event_id: str = Field(primary_key=True)
    user_id: str


async def create_tables(engine: AsyncEngine) -> None:
    """The runtime's tables and ``fault_things`` (idempotent)."""
    await create_runtime_tables(engine)
    async with engine.begin() as conn:
        await conn.run_sync(
            lambda c: SQLModel.metadata.create_all(
                c, tables=[SQLModel.metadata.tables["fault_things"]]
            )
        )


def handler_for(mode: str, delay_seconds: float) -> Handler:
    async def on_user_created(event: CloudEvent[UserCreatedV2], uow: UnitOfWork) -> None:
        if mode == "crash" and event.data.user_id.startswith(CRASH_MARKER):
            os._exit(1)  # a segfault, an OOM kill: no except, no finally, no ack
        if mode == "slow":
            await asyncio.sleep(delay_seconds)
        if mode == "hang" and event.data.user_id.startswith(HANG_MARKER):
            await asyncio.Event().wait()  # a call that never answers: only a timeout ends it
        uow.session.add(FaultThing(event_id=event.id, user_id=event.data.user_id))

    return on_user_created


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--mode", choices=("ok", "crash", "slow", "hang"), default="ok")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--delivery-limit", type=int, default=10)
    parser.add_argument("--handler-timeout", type=float, default=60.0)
    parser.add_argument("--inprocess-retries", type=int, default=3)
    return parser.parse_args(argv)


def watch_stdin(
    loop: asyncio.AbstractEventLoop, line: asyncio.Future[str], stop: asyncio.Event
) -> None:
    """The first line is the command line to run; the end of input (the parent is gone) stops."""
    with contextlib.suppress(RuntimeError):  # the loop may be closed by then
        first = sys.stdin.readline()
        loop.call_soon_threadsafe(line.set_result, first)
        if first:
            sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)


async def run(argv: Sequence[str]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if list(argv) == [STANDBY]:
        # imports done: what follows the command line is what a restart really costs
        line: asyncio.Future[str] = loop.create_future()
        threading.Thread(target=watch_stdin, args=(loop, line, stop), daemon=True).start()
        stopped = asyncio.ensure_future(stop.wait())
        either: list[asyncio.Future[Any]] = [line, stopped]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not line.done() or not line.result():
            return 0
        argv = json.loads(line.result())
    args = parse_args(argv)
    engine = create_engine(args.db)
    await create_tables(engine)
    bus = Bus(
        args.service,
        engine,
        handlers={UserCreatedV2: handler_for(args.mode, args.delay_ms / 1000)},
        settings=isolated_settings(
            args.broker,
            name_prefix=args.prefix,
            delivery_limit=args.delivery_limit,
            handler_timeout_seconds=args.handler_timeout,
            inprocess_retries=args.inprocess_retries,
        ),
    )
    await bus.start()
    print(READY, flush=True)
    await stop.wait()
    await bus.stop()
    await engine.dispose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    return asyncio.run(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
