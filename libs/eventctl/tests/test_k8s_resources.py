"""``eventctl k8s topology`` / ``k8s autoscaling``: the catalog's broker access and consumers as
Kubernetes custom resources, equal to what ``broker definitions`` writes.

The committed files under deploy/k8s must be what the catalog generates today.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tributary.contracts.catalog import catalog
from tributary.eventctl.access import definitions, passwords, plan_access
from tributary.eventctl.cli import main
from tributary.eventctl.k8s import (
    autoscaling_resources,
    object_name,
    policy_resource,
    render_documents,
    topology_resources,
    work_queues,
)
from tributary.messaging.topology import Names

ROOT = Path(__file__).resolve().parents[3]
TOPOLOGY = ROOT / "deploy" / "k8s" / "base" / "rabbitmq" / "topology.yaml"
AUTOSCALING = ROOT / "deploy" / "k8s" / "base" / "autoscaling" / "autoscaling.yaml"
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _definitions() -> dict[str, Any]:
    plan = plan_access(catalog())
    return definitions(plan, passwords(plan, from_env=False), demo=True)


def _by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


@pytest.mark.parametrize(
    ("command", "committed"), [("topology", TOPOLOGY), ("autoscaling", AUTOSCALING)]
)
def test_the_committed_file_is_what_the_command_writes(
    command: str, committed: Path, tmp_path: Path
) -> None:
    out = tmp_path / f"{command}.yaml"
    assert main(["k8s", command, "--out", str(out)]) == 0
    assert out.read_text() == committed.read_text(), (
        f"regenerate: eventctl k8s {command} --out {committed.relative_to(ROOT)}"
    )


def test_every_user_and_its_permissions_are_the_definitions() -> None:
    docs = list(yaml.safe_load_all(TOPOLOGY.read_text()))
    users, perms = _by_kind(docs, "User"), _by_kind(docs, "Permission")
    topics = _by_kind(docs, "TopicPermission")
    defined = _definitions()

    by_user = {p["spec"]["userReference"]["name"]: p["spec"]["permissions"] for p in perms.values()}
    assert len(users) == len(defined["users"]) == len(perms)
    for entry in defined["permissions"]:
        role = entry["user"]  # no user prefix: the user name is the role
        name = f"broker-{role}"
        user = users[name]
        assert user["spec"]["importCredentialsSecret"] == {"name": name}
        assert user["spec"]["rabbitmqClusterReference"] == {"name": "tributary-rabbitmq"}
        assert by_user[name] == {k: entry[k] for k in ("configure", "write", "read")}
        assert perms[name]["spec"]["vhost"] == entry["vhost"]
    for entry in defined["users"]:
        assert users[f"broker-{entry['name']}"]["spec"]["tags"] == entry["tags"]
    assert len(topics) == len(defined["topic_permissions"])
    for entry in defined["topic_permissions"]:
        spec = topics[f"broker-{entry['user']}"]["spec"]
        assert spec["vhost"] == entry["vhost"]
        assert spec["permissions"] == {k: entry[k] for k in ("exchange", "write", "read")}
    # the definitions have no policies today, and so no Policy objects here
    assert defined["policies"] == []
    assert _by_kind(docs, "Policy") == {}
    # the default vhost needs no Vhost object
    assert _by_kind(docs, "Vhost") == {}


def test_a_definitions_policy_becomes_a_policy_object() -> None:
    policy = {
        "name": "dlq-length",
        "vhost": "/",
        "pattern": r"^.*\.dlq$",
        "apply-to": "queues",
        "definition": {"max-length": 100000},
        "priority": 1,
    }
    documents = topology_resources(plan_access(catalog()), policies=[policy])
    (found,) = [d for d in documents if d["kind"] == "Policy"]
    assert found["spec"] == {
        "rabbitmqClusterReference": {"name": "tributary-rabbitmq"},
        "name": "dlq-length",
        "vhost": "/",
        "pattern": r"^.*\.dlq$",
        "applyTo": "queues",
        "definition": {"max-length": 100000},
        "priority": 1,
    }
    assert policy_resource(policy, "x")["metadata"]["name"] == "policy-dlq-length"


def test_another_vhost_gets_its_vhost_object_and_prefixed_users() -> None:
    plan = plan_access(catalog(), vhost="staging", user_prefix="staging.")
    documents = topology_resources(plan)
    assert _by_kind(documents, "Vhost")["vhost-staging"]["spec"]["name"] == "staging"
    assert all(
        d["spec"]["vhost"] == "staging"
        for d in documents
        if d["kind"] in ("Permission", "TopicPermission")
    )


def test_each_consumer_scales_on_the_queues_its_user_may_read() -> None:
    cat = catalog()
    plan = plan_access(cat)
    docs = list(yaml.safe_load_all(AUTOSCALING.read_text()))
    scaled = _by_kind(docs, "ScaledObject")
    auths = _by_kind(docs, "TriggerAuthentication")
    consumers = [s for s in cat.services if cat.consumed_by(s)]
    assert sorted(scaled) == sorted(consumers)
    for service in consumers:
        spec = scaled[service]["spec"]
        assert spec["scaleTargetRef"]["name"] == service
        queues = [t["metadata"]["queueName"] for t in spec["triggers"]]
        assert queues == work_queues(cat, service, Names())
        read = plan.user(service).permissions.read
        for trigger in spec["triggers"]:
            assert trigger["type"] == "rabbitmq"
            assert re.fullmatch(read, trigger["metadata"]["queueName"])
            assert trigger["metadata"]["mode"] == "QueueLength"
            assert trigger["name"] == trigger["metadata"]["queueName"].replace(".", "-")
            auth = auths[trigger["authenticationRef"]["name"]]
            secrets = {ref["name"] for ref in auth["spec"]["secretTargetRef"]}
            assert secrets == {f"broker-{service}"}
    # the event queue of every service that subscribes, the command queue of every handler
    assert "email.send" in work_queues(cat, "email", Names())
    assert "audit.events" in work_queues(cat, "audit", Names())


def test_prefixed_names_reach_the_triggers() -> None:
    cat = catalog()
    documents = autoscaling_resources(cat, plan_access(cat, name_prefix="t1."), name_prefix="t1.")
    queues = [
        t["metadata"]["queueName"]
        for d in documents
        if d["kind"] == "ScaledObject"
        for t in d["spec"]["triggers"]
    ]
    assert queues
    assert all(q.startswith("t1.") for q in queues)


def test_rendering_is_stable_yaml_with_the_header() -> None:
    text = render_documents(topology_resources(plan_access(catalog())), "topology")
    assert text.startswith("# Generated by `eventctl k8s topology`")
    assert list(yaml.safe_load_all(text)) == topology_resources(plan_access(catalog()))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("comments-app", "comments-app"), ("a..b", "a.b"), ("Staging.Audit_App", "staging.audit-app")],
)
def test_object_name_examples(name: str, expected: str) -> None:
    assert object_name(name) == expected


@given(st.text(alphabet=st.sampled_from("aZ9.-_ é"), max_size=300) | st.text(max_size=80))
def test_object_names_are_dns_subdomains(name: str) -> None:
    cleaned = object_name(name)
    assert DNS_SUBDOMAIN.fullmatch(cleaned), cleaned
    assert len(cleaned) <= 253
