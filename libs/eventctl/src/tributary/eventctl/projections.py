"""``eventctl projections list`` and ``eventctl projections rebuild <name>``.

eventctl imports no service: a service that has rebuildable projections registers an object
in the ``tributary.projections`` entry point group (billing:
``billing = "tributary.billing.rebuild:PROJECTIONS"``) that has the shape of
:class:`Projections` below. The commands find them through the installed packages' metadata.

A rebuild is blue/green: a fresh table is filled from the whole event store while the old
one keeps serving, caught up to the live position, then swapped in atomically under the
store's append lock; the old table is dropped after a grace period. It never appends, stages
or publishes anything (no side effect runs again). The service's docstring of its rebuild
module says the rest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, cast

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.eventctl import progress
from tributary.eventctl.arguments import positive
from tributary.eventctl.replay import DatabaseMissing, database_engine

GROUP = "tributary.projections"
EXIT_OK, EXIT_ERROR = 0, 2


# -- what a service registers -----------------------------------------------------------------


class Status(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def table(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def head(self) -> int: ...
    @property
    def rebuilding(self) -> str | None: ...
    @property
    def rebuild_position(self) -> int | None: ...


class RebuildProgress(Protocol):
    @property
    def phase(self) -> str: ...
    @property
    def events(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def head(self) -> int: ...


class Report(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def old_table(self) -> str: ...
    @property
    def new_table(self) -> str: ...
    @property
    def events(self) -> int: ...
    @property
    def at_swap(self) -> int: ...
    @property
    def from_position(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def old_rows(self) -> int: ...
    @property
    def new_rows(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def dropped(self) -> bool: ...
    @property
    def cleaned(self) -> tuple[str, ...]: ...


class Projections(Protocol):
    """A service's rebuildable projections (an entry point of group ``tributary.projections``).

    ``rebuild`` raises ``LookupError`` for an unknown name and a ``RuntimeError`` when it
    cannot start or finish (another rebuild under way); the live table is then unchanged."""

    @property
    def service(self) -> str: ...

    def names(self) -> list[str]: ...

    def database_url(self) -> str:
        """The service's database as the service itself is configured (its environment)."""
        ...

    def status(self, engine: AsyncEngine) -> Awaitable[Sequence[Status]]: ...

    def rebuild(
        self,
        engine: AsyncEngine,
        name: str,
        *,
        batch: int = ...,
        progress: Callable[[Any], Awaitable[None] | None] | None = ...,
        grace: float = ...,
    ) -> Awaitable[Report]: ...


class UsageError(Exception):
    """A name or an option that does not fit what is installed: exit 2."""


def registered() -> dict[str, Projections]:
    """The installed services' projections, by service (the entry point's name)."""
    found: dict[str, Projections] = {}
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        found[point.name] = cast(Projections, point.load())
    return found


@dataclass(frozen=True)
class Target:
    service: str
    name: str
    projections: Projections

    @property
    def label(self) -> str:
        return f"{self.service}.{self.name}"


def resolve(found: dict[str, Projections], wanted: str, service: str | None) -> Target:
    """``name`` or ``service.name`` (``--service`` narrows) to one registered projection."""
    if service is None and "." in wanted:
        service, _, wanted = wanted.partition(".")
    known = [f"{s}.{n}" for s, p in found.items() for n in p.names()]
    listing = ", ".join(known) or "none (no service registers any)"
    if service is not None and service not in found:
        raise UsageError(f"no service {service!r} has projections (known: {listing})")
    matches = [
        Target(s, wanted, p)
        for s, p in found.items()
        if (service is None or s == service) and wanted in p.names()
    ]
    if not matches:
        raise UsageError(f"no projection {wanted!r} (known: {listing})")
    if len(matches) > 1:
        raise UsageError(
            f"{wanted!r} is a projection of several services "
            f"({', '.join(m.service for m in matches)}): name it service.{wanted}"
        )
    return matches[0]


def _engine(args: argparse.Namespace, projections: Projections) -> AsyncEngine:
    return database_engine(args.database or projections.database_url())


# -- the commands -----------------------------------------------------------------------------


def _int(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


async def list_command(args: argparse.Namespace) -> int:
    try:
        found = registered()
        services = sorted(found)
        if args.service is not None:
            if args.service not in found:
                raise UsageError(f"no service {args.service!r} has projections")
            services = [args.service]
        if args.database and len(services) > 1:
            raise UsageError("--database names one service's database: add --service")
        lines: list[tuple[str, ...]] = []
        for service in services:
            engine = _engine(args, found[service])
            try:
                statuses = await found[service].status(engine)
            finally:
                await engine.dispose()
            for s in statuses:
                rebuilding = "—"
                if s.rebuilding is not None:
                    rebuilding = f"{s.rebuilding} at {_int(s.rebuild_position)}"
                lines.append(
                    (
                        service,
                        s.name,
                        s.table,
                        _int(s.position),
                        _int(s.head),
                        _int(s.head - s.position),
                        rebuilding,
                    )
                )
    except (UsageError, DatabaseMissing) as exc:
        print(f"eventctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SQLAlchemyError as exc:
        print(f"eventctl: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    head = ("service", "projection", "table", "position", "head", "lag", "rebuild under way")
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    for row in [head, *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


class Told:
    """Feeds the rebuild's reports into the shared progress bar: events replayed of the
    live head, with the rate and the ETA."""

    def __init__(self, label: str, shown: progress.Bar) -> None:
        self.label = label
        self.shown = shown

    def __call__(self, told: RebuildProgress) -> None:
        total = max(told.head, told.position)
        description = f"{told.phase}: {self.label}" if told.phase in ("swap", "done") else None
        self.shown.update(completed=told.position, total=total, description=description)


def summary(target: Target, report: Report) -> list[str]:
    rate = report.events / report.seconds if report.seconds > 0 else 0.0
    lines = [
        f"rebuilt {target.label}: {report.old_table} -> {report.new_table} (serving now)",
        f"  events replayed: {report.events:,} (up to position {report.position:,}; "
        f"the last {report.at_swap:,} under the append lock)",
        f"  rows: {report.old_rows:,} in {report.old_table}, "
        f"{report.new_rows:,} in {report.new_table}",
        f"  position: {report.position:,} (the live table was at "
        f"{report.from_position:,} when the rebuild started)",
        f"  took: {report.seconds:.1f} s, {report.batches:,} batch(es), {rate:,.0f} events/s",
    ]
    if report.cleaned:
        lines.append(f"  left over by an interrupted rebuild, dropped: {', '.join(report.cleaned)}")
    lines.append(
        f"  old table {report.old_table} dropped"
        if report.dropped
        else f"  old table {report.old_table} kept"
    )
    return lines


async def rebuild_command(args: argparse.Namespace) -> int:
    try:
        target = resolve(registered(), args.name, args.service)
        engine = _engine(args, target.projections)
        try:
            with progress.bar(
                f"rebuild {target.label}", unit="events", no_progress=args.no_progress
            ) as shown:
                report = await target.projections.rebuild(
                    engine,
                    target.name,
                    batch=args.batch,
                    progress=Told(target.label, shown),
                    grace=args.grace,
                )
        finally:
            await engine.dispose()
    except (UsageError, DatabaseMissing, LookupError, RuntimeError) as exc:
        print(f"eventctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SQLAlchemyError as exc:
        print(f"eventctl: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print("\n".join(summary(target, report)))
    return EXIT_OK


# -- arguments --------------------------------------------------------------------------------


def _seconds(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return number


def _database_arguments() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database",
        "--database-url",
        dest="database",
        metavar="URL",
        help="the service's database (postgresql+asyncpg://… or sqlite+aiosqlite:///…; "
        "default: the service's own setting, e.g. $BILLING_DATABASE_URL)",
    )
    common.add_argument(
        "--service", metavar="SERVICE", help="only this service's projections (e.g. billing)"
    )
    return common


def add_projections_commands(groups: Any) -> None:
    projections = groups.add_parser(
        "projections", help="list and rebuild event-sourced read models (projections)"
    )
    cmds = projections.add_subparsers(dest="command", metavar="COMMAND", required=True)
    listing = cmds.add_parser(
        "list",
        parents=[_database_arguments()],
        help="each projection's table, position, the live head and the lag",
        description="Show each registered projection: the table it serves from, the store "
        "position applied to it, the store's head, the lag, and a rebuild under way.",
    )
    listing.set_defaults(handler=list_command)

    rebuild = cmds.add_parser(
        "rebuild",
        parents=[_database_arguments()],
        help="rebuild one projection from the whole event store, blue/green",
        description="Fill a fresh table (proj_<name>_<n>) from the whole event store in short "
        "batches while the old table keeps serving, catch up to the live position, then "
        "apply the tail and switch the projection to the new table in one transaction under "
        "the store's append lock: readers move over at that commit. The old table is dropped "
        "after --grace seconds. Nothing is appended, staged or published: no side effect "
        "runs again. One rebuild of a projection at a time; an interrupted one is cleaned up "
        "by the next run (after a minute of silence). Exit 0 rebuilt, 2 on errors (an "
        "unknown name, another rebuild under way, the database).",
    )
    rebuild.add_argument("name", help="the projection: NAME or SERVICE.NAME (see 'list')")
    rebuild.add_argument(
        "--batch",
        type=positive,
        default=500,
        metavar="N",
        help="events per transaction (default 500; the tail at the swap is at most about this)",
    )
    rebuild.add_argument(
        "--grace",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="wait between the swap and dropping the old table (default 2), for requests "
        "that looked the old table up just before the swap",
    )
    rebuild.add_argument("--no-progress", action="store_true", help="no progress bar")
    rebuild.set_defaults(handler=rebuild_command)
