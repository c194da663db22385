"""The DLQ alert in a real Prometheus, against the real email service, drained by the runbook.

Prometheus (Debian's ``prometheus`` package, the binary promtool ships with) runs on a free port
with a temporary data directory, deploy/prometheus/alerts.yml as it is, and a config rendered
from deploy/prometheus/prometheus.yml that scrapes this test's service every second. Eleven
``subscription.activated`` events for a user the email service has never heard of are retried
through every tier and dead-lettered (``retries_exhausted``): past 10, the alert is pending,
then firing once its ``for`` has passed. The cause is fixed (the user's ``user.created``
arrives), the runbook's "Draining a DLQ after a fix" commands run as written, the 11 mails go
out and the alert resolves.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tributary.contracts.envelope import new_event
from tributary.contracts.events import SubscriptionActivatedV1, UserCreatedV2
from tributary.testkit.infra import Found
from tributary.testkit.processes import free_port
from tributary.testkit.waiting import wait_until

from .conftest import new_stack
from .stack import Stack
from .test_alerts import ALERTS, DASHBOARDS, _panels
from .test_runbook import RUNBOOK, TESTED_MARK, argv_of, code_blocks, command_lines

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT = "TributaryDeadLetterQueueDepth"
SERVICES = ("email",)

pytestmark = pytest.mark.slow  # mostly waiting out the alert's `for` and the retry tiers


def render_config(targets: dict[str, str], path: Path) -> Path:
    """deploy/prometheus/prometheus.yml with this test's targets, every second, the rules as
    they are. The shared test broker has no rabbitmq_prometheus: its jobs are left out."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = [str(RULES)]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "tributary"]
    job["static_configs"] = [
        {"targets": [target], "labels": {"service": name}} for name, target in targets.items()
    ]
    config["scrape_configs"] = [job]
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        data = workdir / "prometheus-data"
        data.mkdir()
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as answer:  # noqa: S310
            return json.loads(answer.read()) if path.startswith("/api/") else answer.read()

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            self.get("/-/ready")
        except OSError:
            return False
        return True

    def alerts(self, name: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.get("/api/v1/alerts")["data"]["alerts"]
        return [a for a in found if a["labels"]["alertname"] == name]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus; .ci/run does)")
    return found


@pytest.fixture
def email(request: pytest.FixtureRequest, tmp_path: Path, rabbitmq: Found) -> Iterator[Stack]:
    with new_stack(request, "sqlite", tmp_path, rabbitmq.url, services=SERVICES) as stack:
        stack.start(SERVICES)
        yield stack


def subscription_activated(user_id: str) -> bytes:
    subscription_id = f"sub_{uuid.uuid4().hex[:16]}"
    return new_event(
        routing_key="subscription.activated.v1",
        source="/services/identity",
        subject=f"users/{user_id}",
        idempotencykey=f"subscription.activated:{subscription_id}",
        data=SubscriptionActivatedV1(
            subscription_id=subscription_id,
            user_id=user_id,
            plan="pro",
            payment_id=f"pay_{uuid.uuid4().hex[:16]}",
            activated_at=datetime.now(UTC),
        ),
    ).to_bytes()


def user_created(user_id: str, address: str) -> bytes:
    return new_event(
        routing_key="user.created.v2",
        source="/services/identity",
        subject=f"users/{user_id}",
        idempotencykey=f"user.created:{user_id}",
        data=UserCreatedV2(
            user_id=user_id,
            email=address,
            given_name="Ada",
            family_name="Lovelace",
            plan="free",
            locale="en-GB",
            created_at=datetime.now(UTC),
        ),
    ).to_bytes()


def dashboard_queries() -> list[str]:
    """Every panel query of deploy/grafana/dashboards/, Grafana's variables filled in."""
    queries = []
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())):
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m")
                queries.append(expr.replace("$service", ".*"))
    return queries


def runbook_drain_commands(service: str) -> list[list[str]]:
    [block] = [b for before, b in code_blocks(RUNBOOK.read_text()) if before == TESTED_MARK]
    return [argv_of(line.replace("<service>", service)) for line in command_lines(block)]


def test_a_dlq_past_10_fires_within_its_window_and_the_runbook_drain_resolves_it(
    prometheus_binary: str, email: Stack, tmp_path: Path
) -> None:
    stack = email
    queue = f"{stack.prefix}email.dlq"
    config = render_config({"email": f"127.0.0.1:{stack.ports['email']}"}, tmp_path / "p.yml")
    prometheus = Prometheus(prometheus_binary, config, tmp_path)
    try:
        wait_until(prometheus.ready, what="Prometheus ready")
        wait_until(
            lambda: prometheus.get("/api/v1/query", query='up{service="email"} == 1')["data"][
                "result"
            ],
            what="Prometheus scraping the email service",
        )

        # the rules loaded and healthy; every dashboard query is PromQL this Prometheus runs
        [group] = prometheus.get("/api/v1/rules")["data"]["groups"]
        assert {r["name"] for r in group["rules"]} == set(ALERTS)
        assert {r["health"] for r in group["rules"]} == {"ok"}
        for expr in dashboard_queries():
            answer = prometheus.get("/api/v1/query", query=expr)
            assert answer["status"] == "success", (expr, answer)

        # 11 deliveries the email service cannot handle yet: no address known for the user
        user_id, address = f"usr_{uuid.uuid4().hex[:20]}", f"ada.{uuid.uuid4().hex[:8]}@example.com"
        started = time.monotonic()
        for _ in range(11):
            stack.publish("subscription.activated.v1", subscription_activated(user_id))

        def depth() -> float:
            result = prometheus.get(
                "/api/v1/query", query=f'tributary_dlq_depth{{queue="{queue}"}}'
            )
            return float(result["data"]["result"][0]["value"][1]) if result["data"]["result"] else 0

        wait_until(lambda: depth() == 11, timeout=60, what="11 dead letters seen by Prometheus")
        seen_at = time.monotonic()
        states: list[str] = []

        def firing() -> dict[str, Any] | None:
            alerts = prometheus.alerts(ALERT)
            states.extend(a["state"] for a in alerts)
            return next((a for a in alerts if a["state"] == "firing"), None)

        # its `for` is 30 s; a few seconds more for the scrape and evaluation intervals
        alert = wait_until(firing, timeout=30 + 10, poll=0.5, what=f"{ALERT} firing")
        fired_at = datetime.now(UTC)
        assert alert is not None
        assert "pending" in states, states  # pending first, for the `for` window
        active_at = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", alert["activeAt"]))
        assert (fired_at - active_at).total_seconds() >= 30, (active_at, fired_at)
        fired_after = time.monotonic() - seen_at
        assert alert["labels"] == {
            "alertname": ALERT,
            "queue": queue,
            "service": "email",
            "severity": "warning",
        }
        assert float(alert["value"]) == 11
        assert alert["annotations"]["runbook_url"] == f"docs/runbook.md#{ALERT.lower()}"

        # the fix: the user's user.created arrives, and the email service knows the address
        stack.publish("user.created.v2", user_created(user_id, address))
        database = stack.database_urls["email"].removeprefix("sqlite+aiosqlite:///")

        def known() -> bool:
            with sqlite3.connect(database) as db:
                row = db.execute("SELECT 1 FROM recipients WHERE user_id = ?", (user_id,))
                return row.fetchone() is not None

        wait_until(known, what="the recipient known to the email service")

        # the runbook's procedure, as written, as the operator
        env = {
            "RABBITMQ_URL": stack.url_of("eventctl"),
            "TRIBUTARY_NAME_PREFIX": stack.prefix,
            "TRIBUTARY_BROKER_USER_PREFIX": stack.prefix,  # as var/eventctl.env of make dev
            "PATH": "/usr/bin:/bin",
        }
        outputs = []
        for argv in runbook_drain_commands("email"):
            done = subprocess.run(
                [sys.executable, "-m", "tributary.eventctl", *argv],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
                env=env,
            )
            assert done.returncode == 0, f"eventctl {' '.join(argv)}:\n{done.stdout}{done.stderr}"
            outputs.append(done.stdout + done.stderr)
            if argv[:2] == ["dlq", "replay"] and "--dry-run" not in argv:
                drained_at = time.monotonic()
        assert "selected 11" in outputs[0]  # listed
        assert "selected 0" in outputs[1]  # nothing malformed to archive
        assert "republished 11" in outputs[3]
        assert "scanned 0" in outputs[4]  # the DLQ is empty

        wait_until(lambda: not prometheus.alerts(ALERT), timeout=15, what=f"{ALERT} resolved")
        resolved_after = time.monotonic() - drained_at
        assert depth() == 0
        wait_until(
            lambda: len(stack.mail.to(address)) == 12,
            what="the welcome and the 11 subscription mails",
        )
        print(
            f"{ALERT}: dead letters seen {seen_at - started:.1f} s after publishing, firing "
            f"{fired_after:.1f} s later, resolved {resolved_after:.1f} s after the replay"
        )
    finally:
        prometheus.stop()
