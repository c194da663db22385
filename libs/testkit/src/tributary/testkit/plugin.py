"""pytest plugin: session fixtures ``rabbitmq`` and ``postgres`` found or started on demand,
private ``rabbit_node``/``postgres_node`` servers for fault tests, and a private three-node
``rabbit_cluster`` for failover tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tributary.testkit.infra import Found, InfraUnavailable, find_postgres, find_rabbitmq
from tributary.testkit.nodes import NodeUnavailable, PostgresNode, RabbitCluster, RabbitNode


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


@pytest.fixture
def rabbit_node(tmp_path: Path) -> Iterator[RabbitNode]:
    """A private RabbitMQ node, started for this test and removed after it (fault target)."""
    try:
        node = RabbitNode(tmp_path)
    except NodeUnavailable as exc:
        pytest.skip(f"no private RabbitMQ node: {exc}")
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three private RabbitMQ nodes in one cluster, shared by the tests of a module and removed
    after them. Tests that ask for it are in the cluster lanes: without the RabbitMQ server
    they fail, saying what to install."""
    try:
        cluster = RabbitCluster(tmp_path_factory.mktemp("cluster"))
    except NodeUnavailable as exc:
        pytest.fail(
            f"a RabbitMQ cluster test needs the RabbitMQ server installed here "
            f"(apt-get install rabbitmq-server): {exc}",
            pytrace=False,
        )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_node(tmp_path: Path) -> Iterator[PostgresNode]:
    """A private PostgreSQL server, started for this test and destroyed after it."""
    try:
        node = PostgresNode(tmp_path)
    except NodeUnavailable as exc:
        pytest.skip(f"no private PostgreSQL: {exc}")
    try:
        node.start()
        yield node
    finally:
        node.destroy()
