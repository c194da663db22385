"""bench.signup_ab reads each service's CPU per sign-up from the sign-up bench's output, in the
section form of today's bench and the loose line of older ones -- never a handler time."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], dict[str, float]]:
    """``bench.signup_ab.figures``: the benches are a folder of the repository, not a package
    the workspace installs, so the repository goes on the path for this test only."""
    monkeypatch.syspath_prepend(str(ROOT))
    module: Any = importlib.import_module("bench.signup_ab")
    return module.figures  # type: ignore[no-any-return]


SECTION = """| process | CPU per sign-up | of a core |
|---|---|---|
| email | 28.80 ms | 61% |
| audit | 12.80 ms | 27% |
| identity | 10.57 ms | 22% |
| onboarding | 7.40 ms | 16% |

| consumer | mean time in the handler per event |
|---|---|
| onboarding | 13.94 ms |
| email | 204.15 ms |
| audit | 4.93 ms |
"""

OLD = (
    "  throughput: 300 sign-ups fully processed in 17.93 s = 17/s\n"
    "    CPU per sign-up: identity 13.93 ms (23% of a core), onboarding 10.40 ms (17% of a "
    "core), email 31.97 ms (53% of a core), audit 20.43 ms (34% of a core), rabbitmq 5.30 ms\n"
    "    mean time in the handler per event: onboarding 9.1 ms, email 300.2 ms, audit 3.3 ms\n"
)


def test_the_cpu_table_not_the_handler_times(figures: Callable[[str], dict[str, float]]) -> None:
    assert figures(SECTION) == {"email": 28.8, "audit": 12.8, "identity": 10.57, "onboarding": 7.4}


def test_the_line_of_an_older_bench(figures: Callable[[str], dict[str, float]]) -> None:
    assert figures(OLD) == {"identity": 13.93, "onboarding": 10.4, "email": 31.97, "audit": 20.43}


def test_output_without_the_figures_is_an_error_not_zero(
    figures: Callable[[str], dict[str, float]],
) -> None:
    with pytest.raises(RuntimeError, match="no CPU figure"):
        figures("the bench failed before figure 2")
