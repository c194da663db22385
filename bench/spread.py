"""The spread of a benchmark's figures over K runs: min, median and max of every figure.

    uv run --group bench python -m bench.spread -k 6 [--write FILE] bench.messaging_bench -- ARGS

Runs ``python -m MODULE ARGS --write TMP`` K times, one after another, reads the section each
run wrote, and for every table cell holding figures (every row of every table, every column
but the first) prints the least, the median and the greatest over the runs, number by number
(``7.4 / 14.0 ms`` gives ``min / min``, and so on). Cells that did not change between runs
(labels, targets) are left out, and so are cells whose shape changed (a run that printed
"—" where another printed a figure): the count of runs says how many agreed. The section is
printed, and with ``--write FILE`` put between its markers (``<bench>-spread``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.report import Section, bench_parser, print_section, table

NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")

Key = tuple[str, str, str]
"""(table head, row label, column name)."""


@dataclass(frozen=True)
class Cell:
    template: str
    """The cell with each number replaced by ``{}``."""
    tokens: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Cell:
        return cls(
            NUMBER.sub("{}", text.replace("{", "(").replace("}", ")")), tuple(NUMBER.findall(text))
        )

    @property
    def values(self) -> tuple[float, ...]:
        return tuple(float(t.replace(",", "")) for t in self.tokens)


def shaped(value: float, like: str) -> str:
    """``value`` written as ``like`` is: its decimals, thousands commas and sign."""
    decimals = len(like.split(".", 1)[1]) if "." in like else 0
    text = f"{value:{',' if ',' in like else ''}.{decimals}f}"
    return ("+" + text) if like.startswith("+") and value >= 0 else text


def tables(section: str) -> dict[Key, Cell]:
    """Every cell of every Markdown table in ``section`` by (head, row label, column);
    a label seen again in the same table gets `` #2``, `` #3``..."""
    cells: dict[Key, Cell] = {}
    head: list[str] | None = None
    seen: dict[str, int] = defaultdict(int)
    for line in section.splitlines():
        if not line.startswith("|"):
            head = None
            continue
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head, seen = row, defaultdict(int)
            continue
        if all(set(c) <= {"-", ":"} for c in row):
            continue
        label = row[0]
        seen[label] += 1
        if seen[label] > 1:
            label += f" #{seen[label]}"
        for name, text in zip(head[1:], row[1:], strict=False):
            cells[(" | ".join(head), label, name)] = Cell.parse(text)
    return cells


PICK: dict[str, Callable[[list[float]], float]] = {
    "min": min,
    "median": statistics.median,
    "max": max,
}


def picked(cells: list[Cell], pick: str) -> str:
    """The cells' template with, at each number's place, the ``pick`` of that number."""
    first = cells[0]
    columns = zip(*(c.values for c in cells), strict=True)
    values = [PICK[pick](list(column)) for column in columns]
    # written as the first run wrote it, with thousands commas if any run had them
    likes = [
        next((t for t in tokens if "," in t), tokens[0])
        for tokens in zip(*(c.tokens for c in cells), strict=True)
    ]
    shown = [shaped(v, like) for v, like in zip(values, likes, strict=True)]
    return first.template.format(*shown)


def spread(runs: list[dict[Key, Cell]]) -> list[list[str]]:
    """Rows: figure, column, min, median, max, runs (cells that changed between runs)."""
    rows: list[list[str]] = []
    for key, first in runs[0].items():
        alike = [
            r[key]
            for r in runs
            if key in r
            and r[key].template == first.template
            and len(r[key].tokens) == len(first.tokens)
        ]
        if not first.tokens or len({c.values for c in alike}) < 2:
            continue
        low, mid, high = (picked(alike, pick) for pick in PICK)
        rows.append([key[1], key[2], low, mid, high, str(len(alike))])
    return rows


def run_once(module: str, args: list[str], out: Path) -> str:
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", module, *args, "--write", str(out)]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    text = out.read_text()
    body = re.search(r"<!-- [\w-]+:start -->\n(.*)\n<!-- [\w-]+:end -->", text, re.S)
    return body.group(1) if body else text


def line_of(section: str, prefix: str) -> str:
    return next((ln[len(prefix) :] for ln in section.splitlines() if ln.startswith(prefix)), "?")


def main(argv: list[str] | None = None) -> str:
    parser = bench_parser(__doc__)
    parser.add_argument("-k", type=int, default=6, help="runs (6)")
    parser.add_argument("module", help="a benchmark module, e.g. bench.messaging_bench")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- and its arguments")
    args = parser.parse_args(argv)
    bench_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    with tempfile.TemporaryDirectory(prefix="tributary-spread-") as tmp:
        sections = [run_once(args.module, bench_args, Path(tmp) / "run.md") for _ in range(args.k)]
    name = args.module.rsplit(".", 1)[-1]
    section = Section(
        f"### Spread over {args.k} runs: `{name}`",
        "bench.spread",
        line_of(sections[0], "- versions: "),
    )
    section.settings.append(
        f"each run: `python -m {args.module} {' '.join(bench_args)}`, one after another"
    )
    section.settings += [f"run {i}: {line_of(s, '- run: ')}" for i, s in enumerate(sections, 1)]
    parsed = [tables(s) for s in sections]
    section.add(table(["figure", "column", "min", "median", "max", "runs"], spread(parsed)))
    text = section.markdown()
    print_section(text, args.write, f"{name.replace('_', '-')}-spread")
    return text


if __name__ == "__main__":
    main()
