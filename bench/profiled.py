"""``python -m bench.profiled OUT MODULE``: ``python -m MODULE`` with every thread under the
standard library's cProfile, for the sign-up benchmark's ``--profile``.

Each thread gets its own profiler timed by ``time.thread_time`` (that thread's CPU: time
spent waiting in epoll, on a lock or on a socket is not counted), the main thread from the
start and every other thread (aiosqlite's connection threads among them) from its first
event. ``SIGUSR1`` opens the window to profile (and creates ``OUT.open`` to say so);
``SIGUSR2`` closes it and writes to ``OUT`` (renamed into place whole) what every thread
spent inside the window, as a ``pstats`` file (``python -m pstats OUT`` reads it; own and
cumulative CPU seconds and call counts per function, every thread summed, without callers).
``SIGTERM`` then stops the service as usual (a ``SIGTERM`` re-raised by uvicorn after its
graceful shutdown ends the process with status 0).
"""

from __future__ import annotations

import cProfile
import marshal
import runpy
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

Key = tuple[str, int, str]
Counts = tuple[int, int, float, float]
"""Primitive calls, calls, own seconds, cumulative seconds (a caller's: nc, cc, tt, ct)."""
Totals = dict[Key, tuple[Counts, dict[Key, Counts]]]
"""Function -> its counts, and its counts under each caller."""
Stats = dict[Key, tuple[int, int, float, float, dict[Key, Counts]]]
"""The layout of ``pstats.Stats.stats``."""

_profilers: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start_thread(frame: FrameType, event: str, arg: Any) -> None:
    """The bootstrap profile hook of a new thread: replaced by the thread's own profiler."""
    profiler = cProfile.Profile(time.thread_time)
    with _lock:
        _profilers.append(profiler)
    profiler.enable()


def _add(a: Counts, b: Counts) -> Counts:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])


def totals() -> Totals:
    """What every thread's profiler has counted so far (a function's time counts once it
    returns), summed over the threads."""
    found: Totals = {}
    with _lock:
        profilers = list(_profilers)
    for profiler in profilers:
        for entry in profiler.getstats():
            key = cProfile.label(entry.code)
            own: Counts = (
                entry.callcount - entry.reccallcount,
                entry.callcount,
                entry.inlinetime,
                entry.totaltime,
            )
            counts, callers = found.get(key, ((0, 0, 0.0, 0.0), {}))
            found[key] = (_add(counts, own), callers)
        for entry in profiler.getstats():
            caller = cProfile.label(entry.code)
            for sub in entry.calls or ():
                callee = cProfile.label(sub.code)
                under: Counts = (  # pstats' order for callers: nc, cc, tt, ct
                    sub.callcount,
                    sub.callcount - sub.reccallcount,
                    sub.inlinetime,
                    sub.totaltime,
                )
                callers = found.setdefault(callee, ((0, 0, 0.0, 0.0), {}))[1]
                callers[caller] = _add(callers.get(caller, (0, 0, 0.0, 0.0)), under)
    return found


def _minus(a: Counts, b: Counts) -> Counts:
    return (a[0] - b[0], a[1] - b[1], max(a[2] - b[2], 0.0), max(a[3] - b[3], 0.0))


def window(before: Totals, after: Totals) -> Stats:
    """``after - before`` in the layout of ``pstats``."""
    zero: Counts = (0, 0, 0.0, 0.0)
    stats: Stats = {}
    for key, (counts, callers) in after.items():
        if key[0] == __file__:  # a thread's start (its profiler turning itself on)
            continue
        old, old_callers = before.get(key, (zero, {}))
        cc, nc, tt, ct = _minus(counts, old)
        if nc or tt > 0:
            spent = {c: _minus(v, old_callers.get(c, zero)) for c, v in callers.items()}
            stats[key] = (cc, nc, tt, ct, {c: v for c, v in spent.items() if v[1] or v[2]})
    return stats


def main() -> None:
    out, module = Path(sys.argv[1]), sys.argv[2]
    opened: list[Totals] = []

    # The handlers run on the main thread: its profiler is off while they read the totals, so
    # their own work is not in the window. Turning it off accounts for the frames it was in
    # (up to now) and forgets them: the outermost ones (runpy, uvicorn, the event loop's
    # ``run_until_complete``) are not timed again, so the event loop's own C code between
    # callbacks is not in the window. The bench says how much CPU that leaves out.
    def open_window(signum: int, frame: FrameType | None) -> None:
        main_thread.disable()
        opened[:] = [totals()]
        Path(f"{out}.open").touch()  # the window is open: what the caller waits for
        main_thread.enable()

    def close_window(signum: int, frame: FrameType | None) -> None:
        main_thread.disable()
        stats = window(opened[0] if opened else {}, totals())
        part = Path(f"{out}.part")
        part.write_bytes(marshal.dumps(stats))
        part.replace(out)  # whole once it is there: the caller waits for it to exist

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGUSR1, open_window)
    signal.signal(signal.SIGUSR2, close_window)
    signal.signal(signal.SIGTERM, stop)  # uvicorn restores it and re-raises after shutdown
    threading.setprofile(_start_thread)
    main_thread = cProfile.Profile(time.thread_time)
    _profilers.append(main_thread)
    sys.argv = [module]
    main_thread.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        main_thread.disable()


if __name__ == "__main__":
    main()
