"""The sign-up flow's CPU per sign-up, this checkout against an earlier commit, in one run.

    uv run --group bench python -m bench.signup_ab [--base REV] [--rounds K] [--write FILE]

A machine shared with others changes speed from hour to hour (steal time, other tenants), so
a figure measured last week cannot be compared with one measured today. This runs
``bench.signup_bench --quick --only 2`` (300 sign-ups through the four real services) on the
earlier commit and on this checkout, alternating, ``--rounds`` times each, and prints each
service's CPU per sign-up (median over the rounds) side by side. The earlier commit runs from a
temporary ``git worktree`` with its own sources first on ``PYTHONPATH``, and this checkout
with its sources first on ``PYTHONPATH`` too (same virtualenv, same installed libraries, the
same import path in both arms), so only the code differs. It reads the figures the bench prints: the
section table of this checkout's bench, or the "CPU per sign-up:" line of older ones.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import run_stamp
from bench.report import bench_parser, print_section

ROOT = Path(__file__).resolve().parent.parent
MARKER = "signup-ab"
SERVICES = ("identity", "onboarding", "email", "audit")
_LINE = re.compile(r"(identity|onboarding|email|audit) (\d+(?:\.\d+)?) ms")
_ROW = re.compile(r"^\| (identity|onboarding|email|audit) \| (\d+(?:\.\d+)?) ms \|", re.MULTILINE)
_RATE = re.compile(r"(\d+(?:\.\d+)?) sign-ups fully processed|= (\d+(?:\.\d+)?)/s")


def figures(output: str) -> dict[str, float]:
    """Each service's CPU per sign-up (ms) in a sign-up bench's output, old or new."""
    found: dict[str, float] = {}
    for name, ms in _ROW.findall(output):  # the CPU table comes first (then handler times)
        found.setdefault(name, float(ms))
    if len(found) < len(SERVICES):
        line = next((ln for ln in output.splitlines() if "CPU per sign-up:" in ln), "")
        found = {name: float(ms) for name, ms in _LINE.findall(line)}
    missing = [s for s in SERVICES if s not in found]
    if missing:
        raise RuntimeError(f"no CPU figure for {missing} in the bench's output:\n{output[-2000:]}")
    return found


def source_path(tree: Path) -> str:
    return os.pathsep.join(
        [
            *(str(p) for p in sorted(tree.glob("libs/*/src"))),
            *(str(p) for p in sorted(tree.glob("services/*/src"))),
            str(tree),
        ]
    )


def run_bench(tree: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": source_path(tree)}
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "bench.signup_bench", "--quick", "--only", "2"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the bench failed in {tree}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return figures(done.stdout)


def commit_of(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def main(args: argparse.Namespace) -> str:
    base = commit_of(args.base)
    stamp = run_stamp()
    runs: dict[str, list[dict[str, float]]] = {"base": [], "here": []}
    with tempfile.TemporaryDirectory(prefix="tributary-ab-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), base], cwd=ROOT, check=True
        )
        try:
            for r in range(args.rounds):
                # both arms import their own sources from PYTHONPATH, the same way: an
                # editable install's import hooks must not weigh on one arm only
                order = [("base", tree), ("here", ROOT)]
                for name, where in order if r % 2 == 0 else order[::-1]:
                    got = run_bench(where)
                    runs[name].append(got)
                    shown = ", ".join(f"{s} {got[s]:.2f}" for s in SERVICES)
                    print(f"  round {r + 1} {name}: {shown} ms", flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
            )
    median = {
        name: {s: statistics.median(run[s] for run in got) for s in SERVICES}
        for name, got in runs.items()
    }
    total = {name: sum(m.values()) for name, m in median.items()}
    lines = [
        "## Sign-up flow: CPU per sign-up against an earlier commit",
        "",
        f"`python -m bench.signup_ab --base {args.base} --rounds {args.rounds}` -- {stamp}",
        "",
        f"`bench.signup_bench --quick --only 2` (300 sign-ups, four real services on SQLite, "
        f"tracing off) on commit `{base}` and on this checkout, alternating, {args.rounds} "
        "rounds each; medians. Same machine, same hour, same virtualenv: only the code differs.",
        "",
        f"| service | `{base}` | this checkout | change |",
        "|---|---|---|---|",
    ]
    for s in SERVICES:
        old, new = median["base"][s], median["here"][s]
        lines.append(f"| {s} | {old:.2f} ms | {new:.2f} ms | {new / old - 1:+.0%} |")
    lines.append(
        f"| **the four services** | {total['base']:.2f} ms | {total['here']:.2f} ms "
        f"| {total['here'] / total['base'] - 1:+.0%} |"
    )
    met = total["here"] <= total["base"] / 3
    lines += [
        "",
        f"Target (three times less CPU per sign-up than before the CPU work): at most a third "
        f"of `{base}`'s, {total['base'] / 3:.2f} ms: **{'met' if met else 'missed'}**.",
    ]
    if args.quick:
        lines.insert(1, "\n- **`--quick`: one round each, a smoke run, not figures to keep**")
    return "\n".join(lines)


def cli() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--base", default="5fb6ede", help="the earlier commit (default: before the CPU work)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--quick", action="store_true", help="one round each: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    print_section(main(args), args.write, MARKER)


if __name__ == "__main__":
    cli()
