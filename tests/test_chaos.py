"""The chaos soak, short: sign-ups through the four services while a seeded schedule SIGKILLs and
SIGTERMs them, restarts the broker, closes its connections, stops PostgreSQL and pauses SMTP.

About a minute per database on a quiet machine; ``make chaos`` runs the long version. The seed is
fixed so a failure reproduces; ``CHAOS_SEED=<n>`` tries another.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tributary.testkit.nodes import NodeUnavailable, postgres_bin, rabbit_sbin

from .chaos.plan import PROFILES, Database
from .chaos.soak import Config, run

# slow: long and mostly waiting (faults, time windows, processes starting): `make test` runs it
# in its second pytest process, beside the rest of the suite
pytestmark = pytest.mark.slow

SEED = int(os.environ.get("CHAOS_SEED", "20261201"))


@pytest.mark.timeout(600)  # bounded inside: start, faults, load, quiescence and checks each
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_every_sign_up_has_one_user_workspace_mail_and_audit_trail_after_seeded_faults(
    database: Database, tmp_path: Path
) -> None:
    try:
        rabbit_sbin()
        if database == "postgres":
            postgres_bin()
    except NodeUnavailable as exc:
        pytest.skip(f"chaos soak needs private nodes: {exc}")
    config = Config.of(database, SEED, PROFILES["quick"], tmp_path)

    outcome = run(config, say=print)

    print(outcome.report())
    assert outcome.ok, outcome.report()
