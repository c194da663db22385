"""The shared pieces of the long jobs: the bar, the rate limit (a fake clock), Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
from dataclasses import dataclass

import pytest
from rich.console import Console

from tributary.eventctl import progress
from tributary.eventctl.progress import Interrupt, Pace, RateLimiter, Stopped, bar
from tributary.eventctl.projections import Told
from tributary.testkit.waiting import eventually


class FakeClock:
    """A monotonic clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=140), out


# -- the bar ----------------------------------------------------------------------------------


def test_the_bar_shows_the_count_the_rate_and_the_eta() -> None:
    console, out = terminal()
    with bar("replay t.probe.dlq", total=10, console=console) as shown:
        assert shown.enabled
        shown.advance(4)
        shown.progress.refresh()
    drawn = out.getvalue()

    assert "replay t.probe.dlq" in drawn
    assert "4/10" in drawn
    assert "msg/s" in drawn
    assert "ETA" in drawn


def test_no_bar_with_no_progress_or_off_a_terminal() -> None:
    console, out = terminal()
    with bar("x", total=3, no_progress=True, console=console) as shown:
        shown.advance(3)
    assert not shown.enabled
    assert out.getvalue() == ""

    log = io.StringIO()
    with bar("x", total=3, console=Console(file=log)) as shown:
        shown.advance(3)
    assert not shown.enabled
    assert log.getvalue() == ""


def test_the_bar_draws_on_stderr_by_default() -> None:
    console = progress.stderr_console()
    assert console.stderr


# -- the rate limit ---------------------------------------------------------------------------


async def test_the_rate_limit_spreads_acquisitions_one_over_rate_apart() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, burst=1, clock=clock, sleep=clock.sleep)
    start = clock.now

    for _ in range(21):
        await limiter.acquire()

    # the first comes at once, then one every 0.1 s
    assert clock.now - start == pytest.approx(2.0)
    assert all(s == pytest.approx(0.1) for s in clock.slept)


async def test_paced_from_the_start_not_a_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(50, clock=clock, sleep=clock.sleep)
    start = clock.now

    for _ in range(151):
        await limiter.acquire()

    # the first at once, the other 150 at 50 per second
    assert clock.now - start == pytest.approx(3.0)


async def test_after_a_stall_it_catches_up_by_at_most_a_second() -> None:
    clock = FakeClock()
    limiter = RateLimiter(50, clock=clock, sleep=clock.sleep)
    clock.now += 10  # the broker was slow: ten seconds without an acquisition

    assert sum(limiter.delay() == 0.0 for _ in range(100)) == 50


async def test_concurrent_acquirers_queue_up() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4, burst=1, clock=clock, sleep=clock.sleep)
    waits = [limiter.delay() for _ in range(5)]

    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


async def test_idle_time_refills_at_most_the_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, clock=clock, sleep=clock.sleep)
    assert limiter.delay() == 0.0
    clock.now += 3600  # an hour idle: still only one second's worth

    assert [limiter.delay() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.5])


async def test_no_rate_no_wait() -> None:
    limiter = RateLimiter(None)
    assert [limiter.delay() for _ in range(1000)] == [0.0] * 1000


@pytest.mark.parametrize("rate", [0, -1.5])
def test_a_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(rate)


# -- Ctrl-C -----------------------------------------------------------------------------------


async def test_ctrl_c_sets_the_flag_instead_of_raising(capsys: pytest.CaptureFixture[str]) -> None:
    with Interrupt.on_sigint() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)

        async def requested() -> bool:  # once the loop has run its signal handler
            return stop.requested

        await eventually(requested, timeout=1, what="the SIGINT flag")
    assert "interrupted" in capsys.readouterr().err
    # the default handler is back: Ctrl-C raises KeyboardInterrupt again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_pace_admits_until_ctrl_c_then_stops() -> None:
    clock = FakeClock()
    stop = Interrupt()
    pace = Pace(None, RateLimiter(100, clock=clock, sleep=clock.sleep), stop)
    for _ in range(7):
        await pace.admit()
    stop.request()

    with pytest.raises(Stopped):
        await pace.admit()
    assert pace.stopping


@dataclass
class RebuildReport:
    phase: str
    events: int
    position: int
    head: int


def test_a_projection_rebuild_reports_into_the_same_bar() -> None:
    console, out = terminal()
    with bar("rebuild billing.revenue", unit="events", console=console) as shown:
        told = Told("billing.revenue", shown)
        told(RebuildReport("fill", 300, 300, 1000))
        shown.progress.refresh()
        told(RebuildReport("done", 1000, 1000, 1000))
        shown.progress.refresh()
    drawn = out.getvalue()

    assert "300/1000" in drawn
    assert "1000/1000" in drawn
    assert "events/s" in drawn
    assert "done: billing.revenue" in drawn
