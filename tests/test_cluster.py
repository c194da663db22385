"""The sign-up services on a 3-node RabbitMQ cluster keep their guarantees when nodes fail.

identity, onboarding, email and audit run as real processes, each given the three nodes
(``RABBITMQ_URLS``, its own broker user on each, a different node first for each service) and
each declaring its queues as quorum queues with a replica on every node. Sign-ups are POSTed to
identity over HTTP before, during and after the fault. The slow-lane test SIGKILLs the node
leading onboarding's work queue in the middle of that stream; the ``cluster`` suite (``make
cluster-test``) pauses that node for 30 s and restarts all three one by one. Every time: every
accepted sign-up has one user, one workspace, one welcome mail and its three events audited once
(nothing committed is lost, nothing takes effect twice), every outbox row is confirmed, every
work queue has its consumer again with three replicas online, and the longest gap in the
services' effects from the fault on (the time to recover) is printed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tributary.eventctl.credentials import with_user
from tributary.eventctl.provision import RabbitmqctlDefinitions
from tributary.testkit.nodes import RabbitCluster, RabbitNode
from tributary.testkit.waiting import eventually, wait_until

from .chaos.check import Checker
from .chaos.load import LoadGenerator, SignUp, make_signups
from .stack import SIGNUP_SERVICES, Stack

Figures = dict[str, float | str]
Fault = Callable[["ClusterStack", RabbitCluster, RabbitNode], Awaitable[Figures]]

RATE = 8
"""Sign-ups offered per second (as the chaos soak's quick profile)."""


@dataclass
class ClusterStack(Stack):
    """A :class:`Stack` whose services know every node of the cluster."""

    nodes: tuple[str, ...] = ()
    """The nodes' AMQP URLs (administrator's credentials; each service gets its own user's)."""

    def node_urls(self, name: str) -> list[str]:
        """``name``'s user on every node; services start on different nodes (identity and audit
        on the first, onboarding on the second, email on the third) so queue leaders and
        connections are spread as in production."""
        own = urlsplit(self.url_of(name))
        user, password = unquote(own.username or ""), unquote(own.password or "")
        # a short heartbeat: a node that stops answering (SIGSTOP) is left within 18 s
        urls = [with_user(node, user, password) + "?heartbeat=5" for node in self.nodes]
        first = SIGNUP_SERVICES.index(name) % len(urls)
        return urls[first:] + urls[:first]

    def env_for(self, name: str, port: int) -> dict[str, str]:
        env = super().env_for(name, port)
        urls = self.node_urls(name)
        env.update(
            RABBITMQ_URL=urls[0],
            RABBITMQ_URLS=",".join(urls),
            # a node that accepts TCP but does not answer is left after 5 s
            TRIBUTARY_CONNECT_TIMEOUT_SECONDS="5",
            TRIBUTARY_PAUSE_PROBE_MAX_SECONDS="1",
        )
        return env

    def first_node(self, name: str) -> int:
        return SIGNUP_SERVICES.index(name) % len(self.nodes)


@pytest.fixture
def cluster_stack(rabbit_cluster: RabbitCluster, tmp_path: Path) -> Iterator[ClusterStack]:
    """The four sign-up services on the cluster, started; stopped after the test (the cluster,
    and with it the stack's users and queues, goes with the module)."""
    rabbit_cluster.wait_clustered()  # after an earlier test's fault, all three are back
    admin = rabbit_cluster.nodes[0]
    ctl = RabbitmqctlDefinitions(
        executable=str(admin.sbin / "rabbitmqctl"), node=admin.name, env=admin.ctl_env
    )
    databases = {n: f"sqlite+aiosqlite:///{tmp_path / (n + '.db')}" for n in SIGNUP_SERVICES}
    stack = ClusterStack(
        broker_url=admin.url,
        workdir=tmp_path,
        database_urls=databases,
        provisioner=ctl,
        nodes=tuple(rabbit_cluster.urls),
    )
    stack.extra_env.update(TRIBUTARY_RETRY_TIERS="[0.5, 2.0, 5.0]", SMTP_TIMEOUT="5")
    stack.mail.start()
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        stack.mail.stop()


@dataclass
class Stream:
    """Sign-ups offered in batches of a second's worth until :meth:`stop`."""

    stack: Stack
    rate: int = RATE
    loads: list[LoadGenerator] = field(default_factory=list)
    _stopping: bool = False

    @property
    def accepted(self) -> list[SignUp]:
        return [s for load in self.loads for s in load.result.accepted]

    @property
    def pending(self) -> list[SignUp]:
        return [s for load in self.loads for s in load.result.pending]

    async def run(self) -> None:
        run = uuid.uuid4().hex[:6]
        for batch in itertools.count():
            if self._stopping:
                return
            signups = make_signups(self.rate, f"{run}.{batch}")
            load = LoadGenerator(self.stack.url("identity"), signups, rate=self.rate, concurrency=4)
            self.loads.append(load)
            await load.run()  # paced: about a second; retried until each is accepted

    def stop(self) -> None:
        self._stopping = True


def effect_times(stack: Stack) -> dict[str, list[float]]:
    """When each event was handled (epoch seconds), per service: its inbox rows."""
    times: dict[str, list[float]] = {}
    for name in SIGNUP_SERVICES:
        path = stack.database_urls[name].removeprefix("sqlite+aiosqlite:///")
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT processed_at FROM tributary_inbox").fetchall()
        if rows:
            times[name] = sorted(_epoch(value) for (value,) in rows)
    return times


def _epoch(value: str) -> float:
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def longest_gap(times: list[float], fault_at: float) -> tuple[float, float]:
    """The longest time without an effect from the fault on, and when it ended (from the
    fault)."""
    points = [fault_at, *(t for t in times if t >= fault_at)]
    gap, end = max(((b - a, b) for a, b in itertools.pairwise(points)), default=(0.0, fault_at))
    return gap, end - fault_at


def recovery(times: dict[str, list[float]], fault_at: float) -> Figures:
    """Each service's longest gap in effects from the fault on; the time to recover is the
    longest of them (and when it ended, from the start of the fault)."""
    gaps = {name: longest_gap(t, fault_at) for name, t in times.items()}
    worst = max(gaps, key=lambda name: gaps[name][0])
    figures: Figures = {f"{name} longest gap": gap for name, (gap, _) in gaps.items()}
    figures["time to recover (longest gap)"] = gaps[worst][0]
    figures["in"] = worst
    figures["ended after the fault began"] = gaps[worst][1]
    return figures


def work_queues(stack: Stack) -> list[str]:
    return [f"{stack.prefix}{s}.events" for s in SIGNUP_SERVICES] + [f"{stack.prefix}email.send"]


async def consumers_back(stack: ClusterStack, cluster: RabbitCluster) -> None:
    """Every work queue has one consumer and three replicas online; every service is ready."""
    queues = set(work_queues(stack))

    def back() -> bool:
        listed = cluster.nodes[0].ctl(
            "list_queues", "-q", "--formatter", "json", "name", "consumers", "online", check=False
        )
        if listed.returncode != 0:
            return False
        rows = [row for row in json.loads(listed.stdout or "[]") if row.get("name") in queues]
        return len(rows) == len(queues) and all(
            row.get("consumers") == 1 and len(row.get("online") or []) == 3 for row in rows
        )

    await asyncio.to_thread(wait_until, back, timeout=90, poll=0.5, what="consumers on every queue")
    assert all(process.ready() for process in stack.services.values())


async def signups_through_a_fault(
    stack: ClusterStack,
    cluster: RabbitCluster,
    fault: Fault,
    *,
    before: int = 4 * RATE,
    after: int = 4 * RATE,
) -> Figures:
    """Offer sign-ups until ``before`` are accepted, apply ``fault`` to the node leading
    onboarding's work queue while they go on, then ``after`` more; then check every invariant
    and return the figures (the fault's, the counts, the time to recover)."""
    leader = await asyncio.to_thread(cluster.leader, f"{stack.prefix}onboarding.events")
    on_it = [n for n in SIGNUP_SERVICES if cluster.nodes[stack.first_node(n)] is leader]
    stream = Stream(stack)
    task = asyncio.create_task(stream.run())
    try:

        async def accepted(count: int) -> bool:
            if task.done():
                task.result()  # raises what stopped the stream
            return len(stream.accepted) >= count

        await eventually(lambda: accepted(before), timeout=60, what=f"{before} sign-ups")
        fault_at = time.time()
        figures: Figures = {
            "target": f"{leader.name.split('@')[0][-1]} (first node of: {', '.join(on_it)})"
        }
        at_fault = len(stream.accepted)
        figures.update(await fault(stack, cluster, leader))
        done = len(stream.accepted)
        figures["sign-ups accepted during the fault"] = str(done - at_fault)
        await eventually(lambda: accepted(done + after), timeout=60, what="sign-ups after")
    finally:
        stream.stop()
        await asyncio.wait_for(task, timeout=60)
    assert stream.pending == []
    await consumers_back(stack, cluster)
    checker = Checker(stack, cluster.nodes[0].queues)
    try:
        settled_at = time.monotonic()
        assert await checker.quiesce(120, say=print), "not quiescent after 120 s"
        settled = time.monotonic() - settled_at
        found = await checker.check(stream.accepted, mail_windows=0)
    finally:
        await checker.aclose()
    # mail_windows=0: not even one mail resent (no service is killed here)
    assert found.ok, "\n".join(found.problems)
    return {
        **figures,
        **recovery(effect_times(stack), fault_at),
        "quiescent after the stream": settled,
        **{k: str(v) for k, v in found.counts.items()},
        "notes": "; ".join(found.notes),
    }


def report(title: str, figures: Figures) -> None:
    shown = ", ".join(
        f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
    )
    print(f"\n[cluster] {title}: {shown}")


async def kill_and_restart(
    stack: ClusterStack, cluster: RabbitCluster, leader: RabbitNode
) -> Figures:
    killed_at = time.monotonic()
    await asyncio.to_thread(cluster.kill, leader)
    # back at once, while the sign-ups go on: it rejoins as a follower
    await asyncio.to_thread(cluster.restart, leader)
    return {"kill to clustered again": time.monotonic() - killed_at}


async def pause_30_s(stack: ClusterStack, cluster: RabbitCluster, leader: RabbitNode) -> Figures:
    cluster.pause(leader)
    try:
        # the fault itself: the node stays stopped 30 s whatever happens meanwhile
        await asyncio.sleep(30)
    finally:
        cluster.resume(leader)
    resumed_at = time.monotonic()
    await asyncio.to_thread(cluster.wait_clustered, 120)
    return {"SIGCONT to clustered": time.monotonic() - resumed_at}


async def restart_one_by_one(
    stack: ClusterStack, cluster: RabbitCluster, leader: RabbitNode
) -> Figures:
    figures: Figures = {}
    for node in cluster.nodes:
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.restart, node)  # SIGKILL, boot, back in the cluster
        figures[f"{node.name.split('@')[0][-1]} restarted in"] = time.monotonic() - killed_at
    return figures


@pytest.mark.slow
async def test_killing_the_work_queue_leader_under_sign_ups_loses_and_duplicates_nothing(
    rabbit_cluster: RabbitCluster, cluster_stack: ClusterStack
) -> None:
    started = time.monotonic()
    # a short stream (2 s of sign-ups before the kill, 2 s after the node is back): the slow lane
    figures = await signups_through_a_fault(
        cluster_stack, rabbit_cluster, kill_and_restart, before=2 * RATE, after=2 * RATE
    )
    report("SIGKILL of the node leading onboarding's work queue", figures)
    print(f"[cluster] test took {time.monotonic() - started:.1f} s (cluster and services excluded)")


@pytest.mark.slow
@pytest.mark.cluster
async def test_pausing_the_work_queue_leader_30_s_under_sign_ups_loses_and_duplicates_nothing(
    rabbit_cluster: RabbitCluster, cluster_stack: ClusterStack
) -> None:
    figures = await signups_through_a_fault(cluster_stack, rabbit_cluster, pause_30_s)
    report("SIGSTOP 30 s of the node leading onboarding's work queue", figures)


@pytest.mark.slow
@pytest.mark.cluster
async def test_restarting_all_three_nodes_one_by_one_under_sign_ups_loses_and_duplicates_nothing(
    rabbit_cluster: RabbitCluster, cluster_stack: ClusterStack
) -> None:
    figures = await signups_through_a_fault(cluster_stack, rabbit_cluster, restart_one_by_one)
    report("rolling restart (SIGKILL and boot) of the three nodes", figures)
