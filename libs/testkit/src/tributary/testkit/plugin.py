"""pytest plugin: session fixtures ``rabbitmq`` and ``postgres`` found or started on demand."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tributary.testkit.infra import Found, InfraUnavailable, find_postgres, find_rabbitmq


@pytest.fixture(scope="session")
def _infra_stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.fixture(scope="session")
def rabbitmq(_infra_stack: ExitStack) -> Found:
    """The broker for this test session; the run stops with what to install if none."""
    try:
        return find_rabbitmq(_infra_stack)
    except InfraUnavailable as exc:
        pytest.exit(str(exc), returncode=3)


@pytest.fixture(scope="session")
def postgres(_infra_stack: ExitStack) -> Found:
    """A PostgreSQL server; tests that need it are skipped, loudly, if none can be had."""
    try:
        return find_postgres(_infra_stack)
    except InfraUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
