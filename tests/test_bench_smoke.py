"""The benchmarks' code paths at a tiny N, so that they cannot rot between full runs.

Figures at this size mean nothing; what is checked is that a run goes through (the real
service, broker and database), that its own correctness checks pass, and that ``--write``
puts its section between its markers and leaves the rest of the file alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tributary.testkit.infra import Found

ROOT = Path(__file__).resolve().parents[1]


def test_notification_bench_runs_and_writes_its_section(rabbitmq: Found, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Results\n\nkept before\n\n<!-- notification-bench:start -->\nstale\n"
        "<!-- notification-bench:end -->\n\nkept after\n"
    )
    env = {**os.environ, "RABBITMQ_URL": rabbitmq.url}
    arguments = ["-n", "50", "--rounds", "1", "--db", "sqlite", "--write", str(results)]
    run = subprocess.run(
        [sys.executable, "-m", "bench.notification_bench", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| SQLite | 1 | service then raw |" in run.stdout
    assert "!!" not in run.stdout, run.stdout  # every check of every round passed
    row = next(line for line in run.stdout.splitlines() if line.startswith("| SQLite | 1 |"))
    assert row.endswith("| ok |"), row
    written = results.read_text()
    assert written.startswith("# Results\n\nkept before\n\n<!-- notification-bench:start -->\n")
    assert written.endswith("<!-- notification-bench:end -->\n\nkept after\n")
    assert "stale" not in written
    assert "## Notification fan-out" in written
    assert "python -m bench.notification_bench -n 50 --rounds 1 --db sqlite --write" in written
