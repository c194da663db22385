"""The runtime costs benchmark at a tiny N, so that it cannot rot between full runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_costs_bench_runs_and_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "runtime.md"
    results.write_text(
        "# Runtime\n\nkept before\n\n<!-- runtime-costs:start -->\nstale\n"
        "<!-- runtime-costs:end -->\n\nkept after\n"
    )
    arguments = ["-n", "50", "--rounds", "1", "--write", str(results)]
    run = subprocess.run(
        [sys.executable, "-m", "bench.runtime_costs_bench", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "µs" not in line]
    figures = {row.split("|")[1].strip() for row in rows}
    assert figures == {"1", "2", "3", "4", "5"}, run.stdout
    written = results.read_text()
    assert written.startswith("# Runtime\n\nkept before\n\n<!-- runtime-costs:start -->\n")
    assert written.endswith("<!-- runtime-costs:end -->\n\nkept after\n")
    assert "stale" not in written
    assert "parse + admit with the flat check (now)" in written
