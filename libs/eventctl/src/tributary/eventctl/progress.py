"""What every long eventctl job shares: a progress bar, a rate limit and a clean Ctrl-C.

- :func:`bar`: a rich progress bar on stderr with the count, the rate (messages per second)
  and the ETA; off with ``--no-progress`` or when stderr is not a terminal (a ``console``
  given by the caller, e.g. a test's, decides for itself).
- :class:`RateLimiter`: ``--rate N`` as a token bucket (N messages per second, a burst of at
  most one second's worth); the clock and the sleep are injectable.
- :class:`Interrupt`: Ctrl-C (SIGINT) only sets a flag. The jobs check it before they start
  the next publish or write, let what is in flight finish (the confirm, the ack, the fsync),
  print the counts so far and exit :data:`EXIT_INTERRUPTED`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a process stopped by Ctrl-C."""


# -- the progress bar -------------------------------------------------------------------------


class RateColumn(ProgressColumn):
    """``1,234.5 msg/s``: the task's speed over rich's recent samples."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class Bar:
    """One task's bar; :meth:`advance` and :meth:`update` are no-ops when disabled."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress = progress
        self.task = task

    @property
    def enabled(self) -> bool:
        return not self.progress.disable

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def update(
        self,
        *,
        completed: int | None = None,
        total: int | None = None,
        description: str | None = None,
    ) -> None:
        self.progress.update(self.task, completed=completed, total=total, description=description)


def stderr_console() -> Console:
    return Console(stderr=True)


def wanted(no_progress: bool, console: Console) -> bool:
    """A bar unless ``--no-progress``, and only on a terminal (no escapes in a log file)."""
    return not no_progress and console.is_terminal


@contextmanager
def bar(
    description: str,
    *,
    total: int | None = None,
    unit: str = "msg",
    no_progress: bool = False,
    console: Console | None = None,
) -> Iterator[Bar]:
    """A progress bar with count, rate and ETA for the duration of the block.

    ``console``: where to draw (default stderr). A test passes a
    ``Console(file=..., force_terminal=True)`` to see the bar.
    """
    console = console or stderr_console()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not wanted(no_progress, console),
    )
    task = progress.add_task(description, total=total)
    with progress:
        yield Bar(progress, task)


# -- a job's pace: bar, limit, Ctrl-C ---------------------------------------------------------


@dataclass
class Pace:
    """How a long job runs: its progress bar, its rate limit, and the Ctrl-C flag."""

    bar: Bar | None = None
    limiter: RateLimiter | None = None
    stop: Interrupt | None = None

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.requested

    async def admit(self) -> None:
        """Wait for the rate limit; :class:`Stopped` if Ctrl-C came meanwhile (or before)."""
        if self.stopping:
            raise Stopped
        if self.limiter is not None:
            await self.limiter.acquire()
        if self.stopping:
            raise Stopped

    def total(self, n: int | None) -> None:
        if self.bar is not None and n is not None:
            self.bar.update(total=n)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(n)


# -- the rate limit ---------------------------------------------------------------------------


class RateLimiter:
    """At most ``rate`` acquisitions per second, on average; ``None``: no limit.

    A token bucket that starts with one token, holds at most ``burst`` (default one
    second's worth, at least 1: a job that stalled catches up by that much) and refills at
    ``rate`` per second. An acquisition takes a token, going into
    debt when there is none, and sleeps until the debt is paid: concurrent acquirers queue
    up one ``1/rate`` apart.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.capacity = max(1.0, (rate or 1.0) if burst is None else burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = 1.0  # paced from the start; a burst only after idling
        self._stamp = clock()

    def delay(self, n: float = 1.0) -> float:
        """Take ``n`` tokens; the seconds to wait before using them."""
        if self.rate is None:
            return 0.0
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self, n: float = 1.0) -> None:
        wait = self.delay(n)
        if wait > 0:
            await self._sleep(wait)


# -- Ctrl-C -----------------------------------------------------------------------------------


class Interrupt:
    """A flag Ctrl-C sets; jobs check :attr:`requested` between publishes (or writes).

    ``with Interrupt.on_sigint() as stop:`` inside the event loop replaces the default
    KeyboardInterrupt (which would cancel a confirm half-way) for the block.
    """

    def __init__(self) -> None:
        self.requested = False
        self._notice: Callable[[], None] | None = None

    def request(self) -> None:
        if not self.requested and self._notice is not None:
            self._notice()
        self.requested = True

    @classmethod
    @contextmanager
    def on_sigint(cls, *, quiet: bool = False) -> Iterator[Interrupt]:
        stop = cls()
        if not quiet:
            stop._notice = _notice
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        installed = False
        if loop is not None:
            try:
                loop.add_signal_handler(signal.SIGINT, stop.request)
                installed = True
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                installed = False
        try:
            yield stop
        finally:
            if installed and loop is not None:
                loop.remove_signal_handler(signal.SIGINT)

    def __bool__(self) -> bool:
        return self.requested


class Stopped(Exception):
    """Raised inside a job's unit of work that had not started when Ctrl-C came."""


def _notice() -> None:
    print(
        "\neventctl: interrupted: finishing what is in flight, then stopping",
        file=sys.stderr,
        flush=True,
    )
