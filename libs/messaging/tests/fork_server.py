"""Start processes of one service from a parent that has done the imports once.

    python fork_server.py <name>

imports ``tributary.<name>`` and everything it uses, then, for each JSON line on stdin
(``{"env": {...}, "log": path}``), forks a child that runs the service exactly as
``python -m tributary.<name>`` would (settings read from ``env``, uvicorn, its SIGTERM
handling), its output appended to ``log``; the child's pid is printed as a line. When a child
ends, its exit code (negative: killed by that signal) is written to ``<log>.exit``. Children die
with this process; end of input ends it.

A cold interpreter spends 3-4 s of CPU on imports: twenty restarts would be mostly that, not
what a restart costs the service. Forking after the imports (as gunicorn's ``preload`` does)
keeps a restart at what the service itself spends on it.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

PR_SET_PDEATHSIG = 1
exits: dict[int, Path] = {}


def reap(_signum: int, _frame: FrameType | None) -> None:
    """Record the exit code of every child that ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if (log := exits.pop(pid, None)) is not None:
            log.with_name(f"{log.name}.exit").write_text(str(os.waitstatus_to_exitcode(status)))


def run_child(name: str, env: dict[str, str], log: Path) -> None:
    """In the forked child: become the service (never returns)."""
    code = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.environ.clear()
        os.environ.update(env)
        importlib.import_module(f"tributary.{name}.__main__").main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(name: str) -> int:
    for module in (f"tributary.{name}.__main__", f"tributary.{name}.app", "alembic.command"):
        importlib.import_module(module)
    # forking is safe only while nothing else runs: no thread may hold a lock at the fork
    assert threading.active_count() == 1, threading.enumerate()
    signal.signal(signal.SIGCHLD, reap)
    for line in sys.stdin:
        request = json.loads(line)
        log = Path(request["log"])
        sys.stdout.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            run_child(name, request["env"], log)
        exits[pid] = log
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(pid, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
