"""Rebuild one projection blue/green: a fresh table filled from the whole store while the old
one keeps serving, caught up to the live position, then swapped in atomically.

``eventctl projections rebuild <name>`` runs :func:`rebuild` (found through the
``tributary.projections`` entry point, :data:`PROJECTIONS`). The steps:

1. **Claim**: a row ``rebuild:<name>`` in ``projection_state`` names the table being built
   and how far it is (its ``position``); its ``updated_at`` is the rebuild's heartbeat. One
   rebuild of a projection at a time: another is refused while the claim is fresh
   (:class:`RebuildRunning`); a claim silent for ``stale_after`` seconds is an interrupted
   rebuild, and the next run takes it over.
2. **Clean up**: tables ``proj_<name>`` / ``proj_<name>_<n>`` that neither serve nor are
   being built -- the half-built table of an interrupted rebuild, an old table whose drop
   did not happen -- are dropped.
3. **Build**: ``proj_<name>_<n>`` (the next free ``n``) is created and filled from position 0
   in batches, each batch its own short transaction that also moves the claim's position on.
   Appends go on meanwhile (on SQLite a long write transaction would hold them up), and the
   live table keeps serving and being updated.
4. **Catch up**: batches go on until the build is within one batch of the live head (or,
   should appends outpace it, until :data:`STALLED` batches in a row did not get closer).
5. **Swap**: in ONE transaction under the store's append lock (no append can happen
   meanwhile) the tail is applied, the erased users' ids are cleared again (an erasure handled
   during the build cleared them in the old table only), ``projection_state`` is switched to
   the new table at the head and the claim is deleted. Readers look the table up per request:
   they move over at that commit.
6. **Drop** the old table, after ``grace`` seconds (a request that looked the old name up just
   before the swap still finds it); then the erased users' ids are cleared once more (an
   erasure in flight at the swap may have written to the old table: the drop waits for it).

Side effects never run from here: events are only folded into the new table by the
projection's own ``apply``; nothing is appended, staged in the outbox or published.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import MetaData, Table, func, select, update
from sqlalchemy import inspect as inspect_db
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, delete
from sqlmodel import select as select_models
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing.events import CURRENT_VERSIONS
from tributary.billing.eventstore import EventStore
from tributary.billing.models import ProjectionState
from tributary.billing.projections import Projector
from tributary.billing.upcasting import UPCASTERS
from tributary.messaging.db import as_utc, now, session_factory
from tributary.messaging.erasure import ErasedUser

CLAIM_PREFIX = "rebuild:"
"""``projection_state`` rows named ``rebuild:<name>`` are claims of rebuilds under way."""

Phase = Literal["build", "swap", "done"]
STALLED = 10
"""Catch-up batches in a row that may fail to close the gap to the head before the swap."""


class RebuildError(RuntimeError):
    """A rebuild that cannot start or could not finish; the live table is unchanged."""


class RebuildRunning(RebuildError):
    """Another rebuild of the projection is under way (its claim is fresh)."""


class RebuildLost(RebuildError):
    """The rebuild's claim was taken over (it was silent too long) or the projection was
    switched by someone else: this rebuild stops, its table is dropped."""


@dataclass(frozen=True)
class RebuildProgress:
    name: str
    phase: Phase
    events: int
    """Events folded into the new table so far."""
    position: int
    """The store position the new table is built up to."""
    head: int
    """The live head last seen."""


@dataclass(frozen=True)
class RebuildReport:
    name: str
    old_table: str
    new_table: str
    events: int
    """Events replayed into the new table (the whole store up to ``position``)."""
    at_swap: int
    """Of which applied under the append lock at the swap (the tail)."""
    from_position: int
    """The live projection's position when the rebuild started."""
    position: int
    """The new table's position at the swap: the head then."""
    old_rows: int
    new_rows: int
    batches: int
    seconds: float
    dropped: bool
    """Whether the old table was dropped (``drop_old``)."""
    cleaned: tuple[str, ...]
    """Left-over tables of interrupted rebuilds that were dropped first."""


@dataclass(frozen=True)
class ProjectionStatus:
    name: str
    table: str
    position: int
    head: int
    rebuilding: str | None
    """The table a rebuild under way is filling, if any."""
    rebuild_position: int | None

    @property
    def lag(self) -> int:
        return self.head - self.position


Progress = Callable[[RebuildProgress], Awaitable[None] | None]


def claim_name(name: str) -> str:
    return f"{CLAIM_PREFIX}{name}"


def _generations(name: str, tables: Sequence[str]) -> dict[str, int]:
    """The tables of projection ``name`` among ``tables``, with their generation
    (``proj_<name>``: 1, ``proj_<name>_<n>``: n)."""
    pattern = re.compile(rf"proj_{re.escape(name)}(?:_(\d+))?")
    found: dict[str, int] = {}
    for table in tables:
        if matched := pattern.fullmatch(table):
            found[table] = int(matched.group(1) or 1)
    return found


async def _table_names(session: AsyncSession) -> list[str]:
    connection = await session.connection()
    return await connection.run_sync(lambda sync: inspect_db(sync).get_table_names())


async def _drop(sessions: async_sessionmaker[AsyncSession], table_name: str) -> None:
    async with sessions() as session:
        table = Table(table_name, MetaData())
        await session.run_sync(lambda sync: table.drop(sync.connection(), checkfirst=True))
        await session.commit()


async def _count(session: AsyncSession, table: Table) -> int:
    return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def clear_erased(session: AsyncSession, table: Table) -> int:
    """Clear the ids of erased users in ``table`` (one with a ``user_id`` column); how many
    rows. A table built from events keeps the ids its events decrypted to until then."""
    if "user_id" not in table.c:
        return 0
    erased = select(col(ErasedUser.user_id))
    result = await session.exec(
        update(table).where(table.c.user_id.in_(erased)).values(user_id=None)
    )
    return int(result.rowcount or 0)


class Rebuild:
    """One rebuild of one projection (:func:`rebuild` runs it)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        projector: Projector,
        name: str,
        *,
        batch: int,
        progress: Progress | None,
        stale_after: float,
    ) -> None:
        if name not in projector.projections:
            known = ", ".join(sorted(projector.projections))
            raise LookupError(f"no projection {name!r} (known: {known})")
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.sessions = sessions
        self.projector = projector
        self.store = projector.store
        self.projection = projector.projections[name]
        self.name = name
        self.claim = claim_name(name)
        self.batch = batch
        self.progress = progress
        self.stale_after = stale_after
        self.old_table = ""
        self.new_table = ""
        self.from_position = 0
        self.position = 0
        self.events = 0
        self.batches = 0
        self.claimed = False
        self.created = False

    async def _tell(self, phase: Phase, head: int) -> None:
        if self.progress is None:
            return
        told = self.progress(RebuildProgress(self.name, phase, self.events, self.position, head))
        if inspect.isawaitable(told):
            await told

    async def start(self) -> tuple[str, ...]:
        """Claim the projection, name the new table; the left-over tables to drop."""
        async with self.sessions() as session:
            state = await session.get(ProjectionState, self.name)
            if state is None:
                raise LookupError(f"no projection {self.name!r} in projection_state")
            self.old_table, self.from_position = state.table_name, state.position
            claim = await session.get(ProjectionState, self.claim)
            stale_table = None
            if claim is not None:
                silent = (now() - as_utc(claim.updated_at)).total_seconds()
                if silent < self.stale_after:
                    raise RebuildRunning(
                        f"a rebuild of {self.name} into {claim.table_name} is under way (at "
                        f"position {claim.position}, last heard of {silent:.0f} s ago); wait "
                        f"for it to end, or {self.stale_after:.0f} s after it stopped"
                    )
                # an interrupted rebuild: taken over, unless another run does so first
                taken = await session.exec(
                    delete(ProjectionState).where(
                        col(ProjectionState.name) == self.claim,
                        col(ProjectionState.updated_at) == claim.updated_at,
                    )
                )
                if taken.rowcount != 1:
                    raise RebuildRunning(f"another run has just taken over {claim.table_name}")
                stale_table = claim.table_name
                session.expunge(claim)
            tables = _generations(self.name, await _table_names(session))
            if stale_table is not None:
                tables.setdefault(stale_table, 0)
            generations = [*tables.values(), *_generations(self.name, [self.old_table]).values()]
            self.new_table = f"proj_{self.name}_{max([1, *generations]) + 1}"
            session.add(ProjectionState(name=self.claim, table_name=self.new_table, position=0))
            try:
                await session.commit()
            except IntegrityError:  # another run claimed it in between
                raise RebuildRunning(f"another rebuild of {self.name} has just started") from None
        self.claimed = True
        return tuple(sorted(t for t in tables if t not in (self.old_table, self.new_table)))

    async def _beat(self, session: AsyncSession) -> None:
        """Move the claim on to ``position`` (in ``session``'s transaction), or stop if it is
        no longer this rebuild's."""
        moved = await session.exec(
            update(ProjectionState)
            .where(
                col(ProjectionState.name) == self.claim,
                col(ProjectionState.table_name) == self.new_table,
            )
            .values(position=self.position, updated_at=now())
        )
        if moved.rowcount != 1:
            raise RebuildLost(f"the rebuild of {self.name} into {self.new_table} was taken over")

    async def build(self) -> None:
        """Create the new table and fill it, batch by batch, until within one batch of the
        live head."""
        table = self.projection.table(self.new_table)
        async with self.sessions() as session:
            await session.run_sync(lambda sync: table.create(sync.connection()))
            await session.commit()
        self.created = True
        last_gap, stalled = 0, 0
        while True:
            async with self.sessions() as session:
                stored = await self.store.read_all(session, after=self.position, limit=self.batch)
                for event in stored:
                    await self.projection.apply(session, table, event)
                if stored:
                    self.position = stored[-1].position
                await self._beat(session)
                head = await self.store.head(session)
                await session.commit()
            self.events += len(stored)
            self.batches += 1
            await self._tell("build", head)
            gap = head - self.position
            if gap <= self.batch:
                return
            # appends outpacing the build: after STALLED batches that did not close the gap,
            # the rest is applied at the swap (appends wait for it)
            stalled = stalled + 1 if gap >= last_gap else 0
            if stalled >= STALLED:
                return
            last_gap = gap

    async def swap(self) -> int:
        """Apply the tail and switch the projection to the new table, under the append lock;
        how many events the tail had."""
        table = self.projection.table(self.new_table)
        tail = 0
        async with self.sessions() as session:
            await self.store.lock(session)
            state = await session.get(ProjectionState, self.name)
            claim = await session.get(ProjectionState, self.claim)
            if claim is None or claim.table_name != self.new_table:
                raise RebuildLost(
                    f"the rebuild of {self.name} into {self.new_table} was taken over"
                )
            if state is None or state.table_name != self.old_table:
                raise RebuildLost(f"{self.name} was switched to another table meanwhile")
            while stored := await self.store.read_all(
                session, after=self.position, limit=self.batch
            ):
                for event in stored:
                    await self.projection.apply(session, table, event)
                self.position = stored[-1].position
                tail += len(stored)
            await clear_erased(session, table)
            state.table_name = self.new_table
            state.position = self.position
            state.updated_at = now()
            session.add(state)
            await session.delete(claim)
            await session.commit()
        self.claimed = False
        self.events += tail
        return tail

    async def abandon(self) -> None:
        """After a failure: drop the half-built table and give the claim up (if still ours)."""
        if self.created:
            await _drop(self.sessions, self.new_table)
        if self.claimed:
            async with self.sessions() as session:
                await session.exec(
                    delete(ProjectionState).where(
                        col(ProjectionState.name) == self.claim,
                        col(ProjectionState.table_name) == self.new_table,
                    )
                )
                await session.commit()


async def rebuild(
    engine: AsyncEngine | async_sessionmaker[AsyncSession],
    projector: Projector,
    name: str,
    *,
    batch: int = 500,
    progress: Progress | None = None,
    grace: float = 2.0,
    drop_old: bool = True,
    stale_after: float = 60.0,
) -> RebuildReport:
    """Rebuild projection ``name`` blue/green (see the module's docstring) and say what it did.

    ``progress`` is called (or awaited) after each batch and after the swap. ``grace``: seconds
    between the swap and the drop of the old table; ``drop_old=False`` keeps it (to compare).
    :class:`RebuildRunning` if another rebuild of it is under way, :class:`LookupError` for an
    unknown name. On any failure the new table is dropped and the live one is as it was.
    """
    sessions = engine if isinstance(engine, async_sessionmaker) else session_factory(engine)
    started = time.perf_counter()
    run = Rebuild(
        sessions, projector, name, batch=batch, progress=progress, stale_after=stale_after
    )
    leftovers = await run.start()
    try:
        for leftover in leftovers:
            await _drop(sessions, leftover)
        await run.build()
        at_swap = await run.swap()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(run.abandon())
        raise
    old = Table(run.old_table, MetaData())
    new = run.projection.table(run.new_table)
    async with sessions() as session:
        old_rows = await _count(session, old)
        new_rows = await _count(session, new)
    await run._tell("swap", run.position)
    if drop_old:
        if grace > 0:
            await asyncio.sleep(grace)
        await _drop(sessions, run.old_table)
        async with sessions() as session:  # an erasure in flight at the swap is over now
            await clear_erased(session, new)
            await session.commit()
    report = RebuildReport(
        name=name,
        old_table=run.old_table,
        new_table=run.new_table,
        events=run.events,
        at_swap=at_swap,
        from_position=run.from_position,
        position=run.position,
        old_rows=old_rows,
        new_rows=new_rows,
        batches=run.batches,
        seconds=time.perf_counter() - started,
        dropped=drop_old,
        cleaned=leftovers,
    )
    await run._tell("done", run.position)
    return report


async def statuses(
    engine: AsyncEngine | async_sessionmaker[AsyncSession], projector: Projector
) -> list[ProjectionStatus]:
    """Each projection's table, position and the live head; a rebuild under way, if any."""
    sessions = engine if isinstance(engine, async_sessionmaker) else session_factory(engine)
    async with sessions() as session:
        head = await projector.store.head(session)
        rows = {s.name: s for s in (await session.exec(select_models(ProjectionState))).all()}
    found: list[ProjectionStatus] = []
    for name in projector.projections:
        state: ProjectionState | None = rows.get(name)
        if state is None:
            continue
        claim: ProjectionState | None = rows.get(claim_name(name))
        found.append(
            ProjectionStatus(
                name=name,
                table=state.table_name,
                position=state.position,
                head=head,
                rebuilding=None if claim is None else claim.table_name,
                rebuild_position=None if claim is None else claim.position,
            )
        )
    return found


# -- the entry point eventctl finds (group ``tributary.projections``) ---------------------------


class BillingProjections:
    """Billing's projections as ``eventctl projections`` sees them."""

    service = "billing"

    def __init__(self, projector: Projector | None = None) -> None:
        self.projector = projector or Projector(EventStore(UPCASTERS, CURRENT_VERSIONS))

    def names(self) -> list[str]:
        return list(self.projector.projections)

    def database_url(self) -> str:
        """Billing's database, as the service is configured (``BILLING_DATABASE_URL``)."""
        from tributary.billing.settings import Settings

        return Settings().database_url

    async def status(self, engine: AsyncEngine) -> list[ProjectionStatus]:
        return await statuses(engine, self.projector)

    async def rebuild(
        self,
        engine: AsyncEngine,
        name: str,
        *,
        batch: int = 500,
        progress: Progress | None = None,
        grace: float = 2.0,
    ) -> RebuildReport:
        return await rebuild(
            engine, self.projector, name, batch=batch, progress=progress, grace=grace
        )


PROJECTIONS = BillingProjections()
"""Registered as ``billing`` in the ``tributary.projections`` entry point group."""
