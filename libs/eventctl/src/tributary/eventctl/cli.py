"""``eventctl``: the operator CLI.

Commands are grouped (``eventctl <group> <command>``): ``contracts check``, ``dlq list``,
``dlq replay``, ``dlq archive``, ``replay outbox``, ``queue show``, ``queue migrate``,
``outbox parked``, ``outbox resend``, ``erase``, ``broker definitions``,
``broker provision``, ``projections list``, ``projections rebuild``, ``publish``,
``catalog``, ``k8s topology`` and ``k8s autoscaling``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from tributary.contracts.catalog import CatalogError
from tributary.contracts.compat import (
    GitError,
    UpcasterExists,
    check_catalogs,
    compared_versions,
    default_base,
    materialize_ref,
)
from tributary.eventctl.audit import add_audit_commands
from tributary.eventctl.broker_commands import add_broker_commands
from tributary.eventctl.catalog_command import add_catalog_command
from tributary.eventctl.commands import add_dlq_commands, add_replay_commands
from tributary.eventctl.erase import add_erase_command
from tributary.eventctl.k8s import add_k8s_commands
from tributary.eventctl.outbox import add_outbox_commands
from tributary.eventctl.projections import add_projections_commands
from tributary.eventctl.publish import add_publish_command
from tributary.eventctl.queue_commands import add_queue_commands

Handler = Callable[[argparse.Namespace], int | Coroutine[Any, Any, int]]

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2


def _upcaster_exists() -> UpcasterExists:
    try:
        from tributary.contracts.upcasting import has_upcaster
    except ImportError:
        return lambda type_name, from_version: False
    return has_upcaster


def _git_toplevel(cwd: Path) -> Path | None:
    # git from PATH with fixed arguments: the developer's own tool on their own checkout
    proc = subprocess.run(  # noqa: S603
        ["git", "-C", str(cwd), "rev-parse", "--show-toplevel"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    out = proc.stdout.strip()
    return Path(out) if proc.returncode == 0 and out else None


def _subdir(contracts: Path, repo: Path) -> str:
    """Where ``contracts`` lives inside ``repo`` (the same path is read at the base ref)."""
    try:
        return contracts.resolve().relative_to(repo.resolve()).as_posix()
    except ValueError:
        return "contracts"


def _contracts_check(args: argparse.Namespace) -> int:
    repo: Path | None = args.repo or _git_toplevel(Path.cwd())
    if repo is None:
        print("eventctl: not inside a git repository; pass --repo", file=sys.stderr)
        return EXIT_ERROR
    contracts: Path = args.contracts or repo / "contracts"
    if not (contracts / "catalog.yaml").is_file():
        print(f"eventctl: {contracts / 'catalog.yaml'} not found", file=sys.stderr)
        return EXIT_ERROR

    base: str | None = args.against or default_base(repo)
    if base is None:
        print("contracts OK: no base revision to compare against (first commit?); 0 checked")
        return EXIT_OK

    try:
        with tempfile.TemporaryDirectory(prefix="eventctl-contracts-") as tmp:
            old_root = materialize_ref(repo, base, Path(tmp), subdir=_subdir(contracts, repo))
            if old_root is None:
                print(f"contracts OK: {base} has no contracts to compare against; 0 checked")
                return EXIT_OK
            findings = check_catalogs(old_root, contracts, upcaster_exists=_upcaster_exists())
            compared = len(compared_versions(old_root, contracts))
    except (GitError, CatalogError, OSError, json.JSONDecodeError) as exc:
        print(f"eventctl: {exc}", file=sys.stderr)
        return EXIT_ERROR

    breaking = [f for f in findings if not f.needs_review]
    review = [f for f in findings if f.needs_review]
    for finding in review:
        print(f"needs review: {finding}", file=sys.stderr)
    if breaking:
        for finding in breaking:
            print(finding, file=sys.stderr)
        print(
            f"{len(breaking)} incompatible contract change(s) against {base}",
            file=sys.stderr,
        )
        return EXIT_FINDINGS
    if review and args.fail_on_review:
        print(f"{len(review)} contract change(s) to review against {base}", file=sys.stderr)
        return EXIT_FINDINGS
    reviewed = f"; {len(review)} change(s) to review (above)" if review else ""
    print(f"contracts OK: compatible with {base}; {compared} version(s) compared{reviewed}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventctl", description="Tributary operator CLI.")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    _add_contracts(groups)
    add_dlq_commands(groups)
    add_replay_commands(groups)
    add_queue_commands(groups)
    add_outbox_commands(groups)
    add_erase_command(groups)
    add_audit_commands(groups)
    add_broker_commands(groups)
    add_projections_commands(groups)
    add_publish_command(groups)
    add_catalog_command(groups)
    add_k8s_commands(groups)
    return parser


def _add_contracts(groups: Any) -> None:
    contracts = groups.add_parser("contracts", help="event contract tooling")
    contracts_cmds = contracts.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check = contracts_cmds.add_parser(
        "check",
        help="fail on breaking changes to contracts/ since a git revision",
        description=(
            "Compare the working tree's contracts with a git revision and report every "
            "breaking change, and every change of who may publish a type (needs review). "
            "Exit 0 when compatible, 1 on breaking findings (or, with --fail-on-review, "
            "changes to review), 2 on errors."
        ),
    )
    check.add_argument(
        "--against",
        metavar="GIT_REF",
        help="revision to compare with (default: merge-base with main, on main HEAD~1)",
    )
    check.add_argument(
        "--repo",
        type=Path,
        metavar="PATH",
        help="git repository (default: the toplevel of the current directory)",
    )
    check.add_argument(
        "--contracts",
        type=Path,
        metavar="DIR",
        help="contracts directory to check (default: <repo>/contracts)",
    )
    check.add_argument(
        "--fail-on-review",
        action="store_true",
        help="also exit 1 on changes that need review but break nothing (who may publish)",
    )
    check.set_defaults(handler=_contracts_check)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    outcome = handler(args)
    return outcome if isinstance(outcome, int) else asyncio.run(outcome)


async def main_async(argv: Sequence[str] | None = None) -> int:
    """:func:`main` for callers already inside an event loop."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    outcome = handler(args)
    return outcome if isinstance(outcome, int) else await outcome


if __name__ == "__main__":
    sys.exit(main())
