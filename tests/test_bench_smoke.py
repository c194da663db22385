"""The benchmarks' code paths at a tiny N, so that they cannot rot between full runs.

Figures at this size mean nothing; what is checked is that a run goes through (the real
service, broker and database), that its own correctness checks pass, and that ``--write``
puts its section between its markers and leaves the rest of the file alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tributary.testkit.infra import Found

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, arguments: list[str], env: dict[str, str], timeout: float) -> str:
    run = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def stale_results(tmp_path: Path, marker: str) -> Path:
    results = tmp_path / "RESULTS.md"
    results.write_text(
        f"# Results\n\nkept before\n\n<!-- {marker}:start -->\nstale\n"
        f"<!-- {marker}:end -->\n\nkept after\n"
    )
    return results


def check_replaced(results: Path, marker: str) -> str:
    """The section replaced the stale one between its markers; the rest of the file is kept."""
    written = results.read_text()
    assert written.startswith(f"# Results\n\nkept before\n\n<!-- {marker}:start -->\n")
    assert written.endswith(f"<!-- {marker}:end -->\n\nkept after\n")
    assert "stale" not in written
    return written


def test_notification_bench_runs_and_writes_its_section(rabbitmq: Found, tmp_path: Path) -> None:
    results = stale_results(tmp_path, "notification-bench")
    arguments = ["-n", "50", "--rounds", "1", "--db", "sqlite", "--write", str(results)]
    stdout = run_bench("bench.notification_bench", arguments, {"RABBITMQ_URL": rabbitmq.url}, 120)
    assert "| SQLite | 1 | service then raw |" in stdout
    assert "!!" not in stdout, stdout  # every check of every round passed
    row = next(line for line in stdout.splitlines() if line.startswith("| SQLite | 1 |"))
    assert row.endswith("| ok |"), row
    written = check_replaced(results, "notification-bench")
    assert "## Notification fan-out" in written
    assert "python -m bench.notification_bench -n 50 --rounds 1 --db sqlite --write" in written


def test_projection_bench_runs_and_writes_its_section(tmp_path: Path) -> None:
    results = stale_results(tmp_path, "projection-bench")
    arguments = ["-n", "120", "--rounds", "1", "--batch", "50", "--db", "sqlite"]
    stdout = run_bench("bench.projection_bench", [*arguments, "--write", str(results)], {}, 120)
    assert "!!" not in stdout, stdout  # every rebuilt table equals the live one
    for name in ("subscriptions", "revenue"):
        assert f"| rebuild {name}, SQLite: events/s (1 x 120) |" in stdout
    written = check_replaced(results, "projection-bench")
    assert "## Projection rebuild" in written
    assert "python -m bench.projection_bench -n 120 --rounds 1 --batch 50 --db sqlite" in written


# -- the benches whose sections are built by bench/report.py -----------------------------------


def check_section(results: Path, marker: str, heading: str, command: str) -> str:
    """The section replaced the stale one between its markers, and is stamped."""
    written = check_replaced(results, marker)
    assert written.startswith(f"# Results\n\nkept before\n\n<!-- {marker}:start -->\n{heading}\n")
    assert f"- command: `{command}" in written
    stamp = next(line for line in written.splitlines() if line.startswith("- run: commit "))
    assert " UTC, load average " in stamp, stamp
    versions = next(line for line in written.splitlines() if line.startswith("- versions: "))
    for name in ("Python 3.", "RabbitMQ ", "uvloop "):
        assert name in versions, versions
    assert "!!" not in written, written  # every check passed
    return written


def sqlite_sync_rows(written: str) -> None:
    row = next(line for line in written.splitlines() if "2 runtime group commit" in line)
    assert "| bench " in row, row  # CPU beside the rate: this process's
    assert " µs, RabbitMQ " in row, row  # and the broker's
    assert "| bare database, NORMAL: " in row, row  # what it is compared with


def messaging_rows(written: str) -> None:
    for figure in ("2 runtime, batch_max=100, PostgreSQL", "4 outbox relay drain, PostgreSQL"):
        row = next(line for line in written.splitlines() if line.startswith(f"| {figure} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2].startswith("bench "), row  # its CPU: this process's,
        assert "PostgreSQL " in cells[2], row  # the database server's
        assert cells[4].startswith("bench "), row  # the baseline's CPU
        assert "RabbitMQ " in cells[4], row


def signup_rows(written: str) -> None:
    row = next(line for line in written.splitlines() if line.startswith("| 2 sign-ups fully"))
    for process in ("identity", "onboarding", "email", "audit", "rabbitmq", "load generator"):
        assert f"{process} " in row, row  # each process's CPU per sign-up
    assert "| process | CPU per sign-up | of a core |" in written


@pytest.mark.parametrize(
    ("module", "arguments", "heading", "needs_postgres", "timeout", "rows"),
    [
        pytest.param(
            "sqlite_sync_bench",
            "-n 200 --n-single 20",
            "## SQLite durability: `synchronous=FULL` against `NORMAL`",
            False,
            120,
            sqlite_sync_rows,
            id="sqlite_sync",
        ),
        pytest.param(
            "messaging_bench",
            "--only 1,2,4 -n 200 --n-single 40",
            "## Messaging runtime",
            True,
            180,
            messaging_rows,
            id="messaging",
        ),
        pytest.param(  # four service processes: about a minute on a busy machine
            "signup_bench",
            "--only 1,2 -n 10",
            "## Sign-up flow",
            False,
            300,
            signup_rows,
            id="signup",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_bench_writes_its_stamped_section(
    module: str,
    arguments: str,
    heading: str,
    needs_postgres: bool,
    timeout: float,
    rows: Callable[[str], None],
    rabbitmq: Found,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    marker = module.replace("_", "-")
    results = stale_results(tmp_path, marker)
    env = {"RABBITMQ_URL": rabbitmq.url}
    if needs_postgres:
        env["TEST_POSTGRES_URL"] = request.getfixturevalue("postgres").url
    run_bench(f"bench.{module}", [*arguments.split(), "--write", str(results)], env, timeout)
    rows(check_section(results, marker, heading, f"python -m bench.{module} {arguments}"))


def test_spread_of_repeated_runs(rabbitmq: Found, tmp_path: Path) -> None:
    results = stale_results(tmp_path, "sqlite-sync-bench-spread")
    arguments = ["-k", "2", "--write", str(results), "bench.sqlite_sync_bench"]
    arguments += ["--", "-n", "100", "--n-single", "10"]
    run_bench("bench.spread", arguments, {"RABBITMQ_URL": rabbitmq.url}, 120)
    written = results.read_text()
    assert "### Spread over 2 runs: `sqlite_sync_bench`" in written
    assert "| figure | column | min | median | max | runs |" in written
    assert "| 2 runtime group commit (batch_max=100), FULL: throughput | value |" in written
    assert written.count("run 1: commit ") == 1  # the stamp of each run
    assert written.count("run 2: commit ") == 1


def test_profiled_service_writes_the_window_of_every_thread(tmp_path: Path) -> None:
    """``bench.profiled`` (signup_bench --profile): a module run under it is profiled on
    every thread between SIGUSR1 and SIGUSR2, and the libraries' shares are read back."""
    (tmp_path / "sqlite_probe.py").write_text(
        "import os, signal, sqlite3, threading\n"
        "def work():\n"
        "    db = sqlite3.connect(':memory:')\n"
        "    for _ in range(1000):\n"
        "        db.execute('SELECT 1').fetchall()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "thread = threading.Thread(target=work)\n"
        "thread.start()\n"
        "thread.join()\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\n"
    )
    out = tmp_path / "probe.pstats"
    run = subprocess.run(
        [sys.executable, "-m", "bench.profiled", str(out), "sqlite_probe"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    read = (
        "import dataclasses, json, sys; from bench.signup_bench import read_pstats; "
        "print(json.dumps(dataclasses.asdict(read_pstats(sys.argv[1], limit=50))))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", read, str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    found = json.loads(shown.stdout)
    assert found["cpu"] > 0
    assert found["libraries"]["aiosqlite"] > 0  # sqlite3's calls, made on the other thread
    functions = [where for where, _ in found["functions"]]
    assert any("sqlite3.Cursor" in where for where in functions), functions
    assert not any("profiled.py" in where for where in functions), functions  # not its own work


@pytest.mark.slow  # an email process and two SMTP sinks per row: half a minute on a busy machine
def test_email_bench_writes_its_section(rabbitmq: Found, tmp_path: Path) -> None:
    results = stale_results(tmp_path, "email-bench")
    arguments = ["-n", "20", "--db", "sqlite", "--concurrency", "2", "--write", str(results)]
    run_bench("bench.email_bench", arguments, {"RABBITMQ_URL": rabbitmq.url}, 300)
    written = check_replaced(results, "email-bench")
    assert "- command: `python -m bench.email_bench -n 20 --db sqlite --concurrency 2" in written
    assert "!!" not in written, written  # no Message-ID arrived twice
    service = next(line for line in written.splitlines() if "| service, concurrency 2 |" in line)
    raw = next(line for line in written.splitlines() if "| raw aiosmtplib pool, 2 at once" in line)
    assert service.split("|")[6].strip() != "0", service  # connections counted at the sink
    assert raw.split("|")[-2].strip() == "", raw  # the ratio is on the service's row


def test_onboarding_bench_runs_and_writes_its_section(rabbitmq: Found, tmp_path: Path) -> None:
    results = stale_results(tmp_path, "onboarding-bench")
    arguments = ["-n", "60", "--rounds", "1", "--db", "sqlite", "--write", str(results)]
    stdout = run_bench("bench.onboarding_bench", arguments, {"RABBITMQ_URL": rabbitmq.url}, 120)
    assert "!!" not in stdout, stdout  # the warm-up's checks passed
    row = next(line for line in stdout.splitlines() if line.startswith("| SQLite | 1 |"))
    assert row.endswith("| ok |"), row  # 60 workspaces, 60 events published once, queues empty
    written = check_replaced(results, "onboarding-bench")
    assert "## Onboarding draining a backlog" in written
    assert "| ≥ 35% |" in written


def test_rss_bench_runs_and_writes_its_section(rabbitmq: Found, tmp_path: Path) -> None:
    results = stale_results(tmp_path, "rss-bench")
    arguments = ["--quick", "--reads", "10", "--write", str(results)]
    run_bench("bench.rss_bench", arguments, {"RABBITMQ_URL": rabbitmq.url}, 300)
    written = check_replaced(results, "rss-bench")
    assert "`--quick`: a smoke run" in written
    row = next(line for line in written.splitlines() if line.startswith("| this checkout |"))
    assert "MiB" in row, row  # RssAnon growth printed for the run
