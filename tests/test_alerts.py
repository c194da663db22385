"""deploy/prometheus and deploy/grafana, checked without a running stack.

promtool (Debian's ``prometheus`` package; ``.ci/run`` installs it) validates the scrape config
and the rules and runs the rule unit tests of deploy/prometheus/tests/. Every metric and label
an alert or a dashboard query reads is one the code registers (the services' own series), or
one RabbitMQ's rabbitmq_prometheus plugin serves; every alert links its runbook section and has
unit tests that see it firing and not firing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase

from tributary.messaging.consumer import Outcome
from tributary.notification.webhooks import WebhookMetrics
from tributary.observability.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
RUNBOOK = ROOT / "docs" / "runbook.md"

TARGET_LABELS = {"job", "instance", "service"}
"""Labels Prometheus puts on every series of a target (``service``: prometheus.yml's)."""

BROKER_METRICS = {
    # rabbitmq_prometheus, GET /metrics/detailed?family=queue_coarse_metrics&family=
    # queue_consumer_count (its prometheus_rabbitmq_core_metrics_collector), per queue
    "rabbitmq_detailed_queue_messages_ready": {"vhost", "queue"},
    "rabbitmq_detailed_queue_messages_unacked": {"vhost", "queue"},
    "rabbitmq_detailed_queue_messages": {"vhost", "queue"},
    "rabbitmq_detailed_queue_consumers": {"vhost", "queue"},
}
"""Series of the broker's plugin (not registered by our code) that rules or dashboards read."""

SUFFIXES: dict[str, dict[str, set[str]]] = {
    "counter": {"_total": set(), "_created": set()},
    "gauge": {"": set()},
    "histogram": {"_bucket": {"le"}, "_count": set(), "_sum": set(), "_created": set()},
    "summary": {"": {"quantile"}, "_count": set(), "_sum": set(), "_created": set()},
}


def _wrappers(*holders: object) -> list[MetricWrapperBase]:
    found: list[MetricWrapperBase] = []
    for holder in holders:
        found += [v for v in vars(holder).values() if isinstance(v, MetricWrapperBase)]
    return found


@cache
def registered_series() -> dict[str, set[str]]:
    """Every series name the services export, with its label names: the runtime's metrics of
    every service (tributary.observability), the process collector, notification's webhooks."""
    service = ServiceMetrics("any")
    series: dict[str, set[str]] = {}
    for metric in _wrappers(service, service.relay, WebhookMetrics()):
        # type, name and label names: prometheus_client has no public accessor for them
        kind = str(metric._type)
        labels = set(metric._labelnames)
        for suffix, extra in SUFFIXES[kind].items():
            series[metric._name + suffix] = labels | extra
    process = CollectorRegistry()
    ProcessCollector(registry=process)
    for family in process.collect():
        for sample in family.samples:
            series[sample.name] = set(sample.labels)
    assert "process_cpu_seconds_total" in series, "the process collector reads /proc (Linux)"
    assert "process_resident_memory_bytes" in series
    return series


def known_series() -> dict[str, set[str]]:
    return {
        **{name: labels | TARGET_LABELS for name, labels in registered_series().items()},
        **{name: labels | {"job", "instance"} for name, labels in BROKER_METRICS.items()},
        "up": TARGET_LABELS,
    }


# --- reading PromQL ----------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*,?')
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


@cache
def _parse(expr: str) -> tuple[frozenset[str], frozenset[str], tuple[tuple[str, str], ...]]:
    """(metric names, label names used in groupings and matchers, (label, matched value)s)."""
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "x", expr)  # Grafana variables
    labels: set[str] = set()
    matched: list[tuple[str, str]] = []

    def grouping(match: re.Match[str]) -> str:
        labels.update(n.strip() for n in match.group(2).split(",") if n.strip())
        return " "

    def matchers(match: re.Match[str]) -> str:
        body = match.group(1)
        for name, _op, value in _MATCHER.findall(body):
            labels.add(name)
            matched.append((name, value))
        assert _MATCHER.sub("", body).strip() == "", f"unread matcher in {expr!r}: {body!r}"
        return " "

    text = _GROUPING.sub(grouping, text)
    text = _MATCHERS.sub(matchers, text)
    text = re.sub(r'"[^"]*"', " ", text)  # string arguments (label_replace...)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)
    names = {
        name
        for name, call in _IDENTIFIER.findall(text)
        if not call and name.lower() not in _KEYWORDS
    }
    return frozenset(names), frozenset(labels), tuple(matched)


def unknown_in(expr: str) -> list[str]:
    """What ``expr`` reads that no code exports: metric names, label names, outcome values."""
    known = known_series()
    names, labels, matched = _parse(expr)
    problems = [f"metric {n}" for n in sorted(names) if n not in known]
    available = set().union(*(known.get(n, set()) for n in names)) | {"__name__"}
    problems += [f"label {label}" for label in sorted(labels - available)]
    outcomes = {*get_args(Outcome), "replayed"}  # replayed: counted besides the outcome
    for label, value in matched:
        if label == "outcome":
            problems += [f"outcome {v}" for v in value.split("|") if v not in outcomes]
    return problems


def test_the_promql_reader_sees_names_labels_and_values() -> None:
    names, labels, matched = _parse(
        'sum by (service, le) (rate(tributary_x_bucket{outcome=~"a|b", job="j"}[5m]))'
        " / on (service) group_left max(up) > 0.02 and time() - foo_seconds offset 5m"
    )
    assert names == {"tributary_x_bucket", "up", "foo_seconds"}
    assert labels == {"service", "le", "outcome", "job"}
    assert matched == (("outcome", "a|b"), ("job", "j"))
    assert unknown_in('tributary_dlq_depth{queue="q", nosuch="1"}') == ["label nosuch"]
    assert unknown_in('rate(tributary_events_consumed_total{outcome="lost"}[1m])') == [
        "outcome lost"
    ]
    assert unknown_in("tributary_outbox_parked_rows") == ["metric tributary_outbox_parked_rows"]


# --- the rules ---------------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


ALERTS = [rule["alert"] for rule in _rules()]


@pytest.mark.parametrize("name", ALERTS)
def test_each_alert_reads_only_what_the_code_exports(name: str) -> None:
    [rule] = [r for r in _rules() if r["alert"] == name]
    assert unknown_in(rule["expr"]) == []


def test_the_design_thresholds_are_the_rules() -> None:
    rules = {rule["alert"]: rule for rule in _rules()}
    backlog = rules["TributaryConsumerBacklogOld"]["expr"]
    assert "tributary_event_backlog_age_seconds_bucket" in backlog
    assert re.search(r"\)\s*>\s*300\s*$", backlog)  # 5 minutes
    assert re.search(
        r"tributary_dlq_depth\)\s*>\s*10$", rules["TributaryDeadLetterQueueDepth"]["expr"]
    )
    errors = rules["TributaryConsumerErrorRate"]
    assert re.search(r">\s*0\.02\s*$", errors["expr"])  # 2 %
    assert errors["for"] == "10m"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("name", ALERTS)
def test_each_alert_has_severity_annotations_and_its_runbook_section(name: str) -> None:
    [rule] = [r for r in _rules() if r["alert"] == name]
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    annotations = rule["annotations"]
    assert annotations["summary"]
    assert annotations["description"]
    path, _, anchor = annotations["runbook_url"].partition("#")
    assert path == "docs/runbook.md"
    assert anchor == name.lower()
    assert anchor in _anchors(RUNBOOK.read_text()), f"docs/runbook.md has no section {name}"


@pytest.mark.parametrize("name", ALERTS)
def test_each_alert_has_unit_tests_firing_and_not_firing(name: str) -> None:
    firing = quiet = 0
    for path in RULE_TESTS:
        document = yaml.safe_load(path.read_text())
        assert document["rule_files"] == ["../alerts.yml"], path
        for test in document["tests"]:
            for case in test.get("alert_rule_test", []):
                if case["alertname"] == name:
                    firing += bool(case.get("exp_alerts"))
                    quiet += not case.get("exp_alerts")
    assert firing, f"no promtool test sees {name} firing"
    assert quiet, f"no promtool test sees {name} not firing"


# --- promtool ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run does)")
    return found


def _promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_promtool_accepts_the_config(promtool: str) -> None:
    result = _promtool(promtool, "check", "config", CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules(promtool: str) -> None:
    result = _promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_rule_unit_tests_pass(promtool: str) -> None:
    result = _promtool(promtool, "test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_promtool_fails_a_rule_test_that_expects_the_wrong_alert(
    promtool: str, tmp_path: Path
) -> None:
    """The unit tests can fail: a copy expecting the DLQ alert at 10 messages does."""
    (tmp_path / "alerts.yml").write_text(RULES.read_text())
    (tmp_path / "tests").mkdir()
    broken = (PROMETHEUS / "tests" / "dlq_depth.yml").read_text()
    assert 'values: "10x8"' in broken
    broken = broken.replace('values: "10x8"', 'values: "11x8"')
    (tmp_path / "tests" / "dlq_depth.yml").write_text(broken)
    result = _promtool(promtool, "test", "rules", tmp_path / "tests" / "dlq_depth.yml")
    assert result.returncode != 0
    assert "email.send.dlq" in result.stdout + result.stderr


# --- the scrape config -------------------------------------------------------------------------


def test_every_service_with_metrics_is_scraped_under_its_name() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = {
        group["labels"]["service"]: group["targets"]
        for group in jobs["tributary"]["static_configs"]
    }
    assert jobs["tributary"]["honor_labels"] is True
    with_metrics = {"identity", "onboarding", "email", "audit", "notification", "billing"}
    assert set(services) == with_metrics  # the payment provider stands in for a foreign system
    for name, targets in services.items():
        [target] = targets
        assert target.startswith(f"{name}:800"), target
    assert jobs["rabbitmq"]["static_configs"] == [{"targets": ["rabbitmq:15692"]}]
    assert jobs["rabbitmq-queues"]["metrics_path"] == "/metrics/detailed"
    assert config["rule_files"] == ["alerts.yml"]


# --- Grafana -----------------------------------------------------------------------------------


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])  # collapsed rows
    return [p for p in panels if p["type"] != "row"]


def test_the_dashboards_are_provisioned_from_this_directory() -> None:
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "tributary.yml").read_text()
    )
    [entry] = provider["providers"]
    assert entry["options"]["path"] == "/var/lib/grafana/dashboards"
    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    [source] = sources["datasources"]
    assert (source["type"], source["url"], source["uid"]) == (
        "prometheus",
        "http://prometheus:9090",
        "prometheus",
    )
    assert DASHBOARDS, "deploy/grafana/dashboards/*.json"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_each_dashboard_panel_queries_only_what_exists(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"]
    panels = _panels(dashboard)
    assert panels
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        assert panel["title"]
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            problems = unknown_in(target["expr"])
            assert problems == [], f"{panel['title']}: {target['expr']}: {problems}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_dashboard_shows_what_the_runbook_names(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    queries = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    for metric in (
        "tributary_event_backlog_age_seconds_bucket",
        "tributary_dlq_depth",
        "tributary_events_consumed_total",
        "tributary_outbox_oldest_age_seconds",
        "tributary_outbox_pending",
        "tributary_events_published_total",
        "tributary_consumer_paused",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert metric in queries, metric
    titles = {p["title"] for p in _panels(dashboard)}
    runbook = RUNBOOK.read_text()
    for title in re.findall(r"panel \*([^*]+)\*", runbook):
        assert title in titles, f"the runbook names a panel {title!r} the dashboard lacks"


# --- compose -----------------------------------------------------------------------------------


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> repository path of a service's read-only bind mounts."""
    found = {}
    for entry in service.get("volumes", []):
        source, target, *mode = str(entry).split(":")
        if source.startswith("./"):
            assert mode == ["ro"], entry
            found[target] = ROOT / source
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return services


def test_compose_prometheus_runs_this_config_and_these_rules(compose: dict[str, Any]) -> None:
    prometheus = compose["prometheus"]
    mounts = _mounts(prometheus)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert mounts["/etc/prometheus/prometheus.yml"] == CONFIG
    for rule_file in yaml.safe_load(CONFIG.read_text())["rule_files"]:  # relative to the config
        assert mounts[f"/etc/prometheus/{rule_file}"] == PROMETHEUS / rule_file
    assert "9090:9090" in prometheus["ports"]


def test_compose_has_every_scrape_target_on_its_port(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            for target in group["targets"]:
                host, port = target.split(":")
                assert host in compose, f"{job['job_name']}: no compose service {host}"
                environment = compose[host].get("environment", {})
                if host != "rabbitmq":
                    assert environment[f"{host.upper()}_PORT"] == port
    plugins = _mounts(compose["rabbitmq"])["/etc/rabbitmq/enabled_plugins"].read_text()
    assert re.fullmatch(r"\[[a-z_,]+\]\.\n", plugins)
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(plugins[1:-3].split(","))


def test_compose_grafana_is_provisioned_from_deploy_grafana(compose: dict[str, Any]) -> None:
    grafana = compose["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "tributary.yml").read_text()
    )
    assert mounts[provider["providers"][0]["options"]["path"]] == GRAFANA / "dashboards"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounts[str(home.parent)] / home.name in DASHBOARDS
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "prometheus" in compose  # the data source's host (http://prometheus:9090)
