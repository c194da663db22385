"""A replica of the ``ordering`` consumer for tests/test_ordering.py (one OS process each).

    python ordering_worker.py --db URL --broker URL --prefix P --replica NAME --mode M

It consumes ``user.email_changed`` (the catalog copy in ``TRIBUTARY_CONTRACTS_DIR`` decides
whether ``ordering`` has partition queues) into ``ordering_entities`` (one row per user: the
current address and the last sequence applied) and records every application in
``ordering_applied`` (which replica, whether it came in order). ``--mode partitioned`` applies
what arrives (the partition queues keep the order); ``--mode sequence`` checks the sequence
first (stale: skipped; early: parked in the retry tiers). Prints ``READY`` once it consumes;
SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from sqlalchemy import text

from tributary.contracts.envelope import CloudEvent
from tributary.contracts.events import UserEmailChangedV1
from tributary.messaging.bus import Bus
from tributary.messaging.consumer import Handler
from tributary.messaging.db import create_engine
from tributary.messaging.sequence import STALE, EarlyEvent, check_sequence
from tributary.messaging.testing import isolated_settings
from tributary.messaging.uow import UnitOfWork

READY = "READY"
EARLY = [0]
"""Early events seen by this process (each attempt)."""
TABLES = (
    "CREATE TABLE ordering_entities (user_id text PRIMARY KEY, email text NOT NULL, "
    "last_seq integer NOT NULL)",
    "CREATE TABLE ordering_applied (id serial PRIMARY KEY, event_id text NOT NULL, "
    "user_id text NOT NULL, seq integer NOT NULL, replica text NOT NULL, "
    "in_order boolean NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())",
)
TIERS = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
SETTINGS: dict[str, dict[str, object]] = {
    # one worker per partition queue, whole batches in one transaction
    "partitioned": {
        "prefetch": 50,
        "batch_max": 50,
        "retry_tiers": TIERS,
        "partition_stagger_seconds": 1.5,
    },
    # competing replicas: a window of a few events in flight, each in its own transaction
    # (an early event then fails alone, not a whole batch); an early event is retried in the
    # process for a moment (its predecessor is being handled by another replica) before it
    # is parked behind the backlog
    "sequence": {
        "prefetch": 2,
        "batch_max": 1,
        "concurrency": 1,
        "inprocess_retries": 5,
        "inprocess_backoff_seconds": 0.02,
        "retry_tiers": TIERS,
    },
}

APPLY = """
WITH prev AS (SELECT user_id, last_seq FROM ordering_entities WHERE user_id = :u FOR UPDATE),
upd AS (
    UPDATE ordering_entities e SET email = :e, last_seq = :s FROM prev
    WHERE e.user_id = prev.user_id RETURNING prev.last_seq AS last
)
INSERT INTO ordering_applied (event_id, user_id, seq, replica, in_order)
SELECT :id, :u, :s, :r, CAST(:s AS integer) = upd.last + 1 FROM upd
"""


def handler_for(mode: str, replica: str) -> Handler:
    async def on_email_changed(event: CloudEvent[UserEmailChangedV1], uow: UnitOfWork) -> None:
        user, sequence = event.data.user_id, event.sequence or 0
        if mode == "sequence":
            last = (
                await uow.session.execute(
                    text("SELECT last_seq FROM ordering_entities WHERE user_id = :u FOR UPDATE"),
                    {"u": user},
                )
            ).scalar_one()
            try:
                if check_sequence(event, int(last)) == "stale":
                    return
            except EarlyEvent:
                EARLY[0] += 1
                raise
        # one round trip: lock the row, remember its last sequence, update it, record
        await uow.session.execute(
            text(APPLY),
            {"e": event.data.new_email, "s": sequence, "u": user, "id": event.id, "r": replica},
        )

    return on_email_changed


async def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--replica", required=True)
    parser.add_argument("--mode", choices=("partitioned", "sequence"), required=True)
    args = parser.parse_args(argv)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    engine = create_engine(args.db)
    bus = Bus(
        "ordering",
        engine,
        handlers={UserEmailChangedV1: handler_for(args.mode, args.replica)},
        settings=isolated_settings(args.broker, name_prefix=args.prefix, **SETTINGS[args.mode]),
    )
    await bus.start()
    print(READY, flush=True)
    await stop.wait()
    await bus.stop()
    print(f"STATS early={EARLY[0]} stale={sum(STALE.values())}", flush=True)
    await engine.dispose()
    return 0


def main() -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    return asyncio.run(run(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
