"""``python -m tests.chaos``: the chaos soak from the command line (``make chaos``).

Exit status: 0 every invariant held, 1 something failed (the seed and the command that re-runs
it are printed), 2 the soak could not run here (RabbitMQ or PostgreSQL not installed).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import cast

from tributary.testkit.nodes import NodeUnavailable

from .plan import KINDS, PROFILES, Database, FaultKind
from .soak import Config, run


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument(
        "--database", choices=["sqlite", "postgres", "both"], default="both", help="(both)"
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="soak", help="(soak)")
    parser.add_argument("--signups", type=int, help="default: the profile's (soak 5000)")
    parser.add_argument("--faults", type=int, help="default: one per 250 sign-ups (soak)")
    parser.add_argument(
        "--kinds",
        type=kinds,
        help=f"comma-separated fault kinds (default: all that apply): {','.join(KINDS)}",
    )
    parser.add_argument("--seed", type=int, help="default: a random one, printed")
    parser.add_argument("--workdir", type=Path, help="logs and SQLite files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir after a pass")
    return parser.parse_args(argv)


def kinds(value: str) -> tuple[FaultKind, ...]:
    chosen = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; known: {KINDS}")
    return cast(tuple[FaultKind, ...], chosen)


def say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM cleans up like Ctrl-C (inside asyncio.run too, which handles SIGINT itself)."""
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    failed = False
    for database in databases:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"tributary-chaos-{database}-"))
        if args.workdir:
            workdir = workdir / database
        config = Config.of(
            cast(Database, database),
            seed,
            PROFILES[args.profile],
            workdir,
            signups=args.signups,
            faults=args.faults,
            kinds=args.kinds,
        )
        try:
            outcome = run(config, say)
        except NodeUnavailable as exc:
            say(f"cannot run the {database} soak here: {exc}")
            return 2
        except KeyboardInterrupt:
            say(f"interrupted; everything started was stopped. Re-run: {config.rerun()}")
            return 130
        print(outcome.report(), flush=True)
        failed |= not outcome.ok
        if outcome.ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
