"""``eventctl broker definitions``: the users and permissions the catalog implies.

The committed deploy/rabbitmq/definitions.json must be what the catalog generates today.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tributary.contracts.catalog import catalog
from tributary.eventctl.access import (
    NOTHING,
    AccessError,
    definitions,
    demo_password,
    hash_matches,
    password_hash,
    password_variable,
    passwords,
    plan_access,
    render,
)
from tributary.eventctl.cli import main
from tributary.eventctl.provision import differences
from tributary.messaging.topology import Names

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "deploy" / "rabbitmq" / "definitions.json"


def test_the_committed_definitions_are_what_the_catalog_generates() -> None:
    plan = plan_access(catalog(), vhost="/")
    expected = render(definitions(plan, passwords(plan, from_env=False), demo=True))
    assert COMMITTED.read_text(encoding="utf-8") == expected, (
        "deploy/rabbitmq/definitions.json is stale: run "
        "`eventctl broker definitions --name-prefix '' "
        "--out deploy/rabbitmq/definitions.json`"
    )


def test_one_user_per_service_foreign_producer_and_the_operator() -> None:
    cat = catalog()
    plan = plan_access(cat, vhost="v1", user_prefix="v1.")
    roles = {user.role: user for user in plan.users}
    assert set(roles) == {*cat.services, *cat.external_producers, "eventctl"}
    assert {"identity", "onboarding", "email", "audit", "notification", "billing"} <= set(roles)
    assert {"comments-app", "reports-app"} <= set(roles)
    assert all(user.name == f"v1.{user.role}" for user in plan.users)
    assert roles["eventctl"].topic is None
    assert roles["eventctl"].tags == ("management",)
    assert "guest" not in roles


def _matches(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def test_a_service_configures_reads_and_writes_only_its_own_queues() -> None:
    plan = plan_access(catalog())
    email = plan.user("email").permissions
    for own in ("email.events", "email.dlq", "email.retry.1", "email.retry.12", "email.send"):
        assert _matches(email.configure, own)
        assert _matches(email.read, own)
        assert _matches(email.write, own)
    for own in ("email.send.dlq", "email.send.retry.2"):
        assert _matches(email.configure, own)
        assert _matches(email.read, own)
    for foreign in ("audit.events", "audit.dlq", "email.events.migrating", "xemail.events", "x"):
        assert not _matches(email.configure, foreign)
        assert not _matches(email.read, foreign)
        assert not _matches(email.write, foreign)
    for exchange in ("tributary.events", "tributary.dlx"):
        assert _matches(email.configure, exchange)
        assert _matches(email.write, exchange)
    assert _matches(email.write, "amq.default")
    assert not _matches(email.configure, "amq.default")


def test_topic_permissions_follow_the_catalog() -> None:
    plan = plan_access(catalog())
    identity = plan.user("identity").topic
    assert identity is not None
    assert _matches(identity.write, "user.created.v2")
    assert not _matches(identity.write, "workspace.created.v1")
    assert not _matches(identity.write, "user.created.v2.extra")
    assert _matches(identity.read, "user.erased.*")
    assert not _matches(identity.read, "user.created.*")
    assert not _matches(identity.read, "#")
    notification = plan.user("notification").topic
    assert notification is not None
    assert _matches(notification.write, "email.send.v1")  # the command's sender
    email = plan.user("email").topic
    assert email is not None
    assert not _matches(email.write, "email.send.v1")
    assert _matches(email.read, "email.send.*")  # its command queue's binding
    comments = plan.user("comments-app")
    assert comments.topic is not None
    assert _matches(comments.topic.write, "comment.mentioned.v1")
    assert not _matches(comments.topic.write, "report.ready.v1")
    assert comments.permissions.configure == comments.permissions.read == NOTHING
    billing = plan.user("billing")
    assert billing.topic is not None
    assert _matches(billing.topic.write, "payment.refunded.v1")
    assert not _matches(billing.topic.write, "subscription.activated.v1")
    assert _matches(billing.topic.read, "subscription.activated.*")  # the saga's next step
    assert not _matches(billing.topic.read, "payment.succeeded.*")


@given(
    prefix=st.text(alphabet="abcxyz-._/^$*+?()[]{}|\\0123456789", max_size=12),
    tier=st.integers(min_value=1, max_value=99),
)
def test_any_name_prefix_is_matched_literally(prefix: str, tier: int) -> None:
    plan = plan_access(catalog(), name_prefix=prefix)
    names = Names(prefix)
    onboarding = plan.user("onboarding").permissions
    own = names.service_queues("onboarding", tier)
    for name in (own.work, own.dlq, own.retries[-1], names.exchange, names.dlx):
        assert re.fullmatch(onboarding.configure.strip("^$"), name), name
    other = names.service_queues("audit", tier)
    for name in (other.work, other.dlq, "onboarding.events" if prefix else "x"):
        assert not _matches(onboarding.configure, name)


def test_demo_hashes_verify_and_are_rabbitmq_sha256() -> None:
    document = json.loads(COMMITTED.read_text(encoding="utf-8"))
    for user in document["users"]:
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert len(base64.b64decode(user["password_hash"])) == 4 + 32
        assert hash_matches(demo_password(user["name"]), user["password_hash"])
        assert not hash_matches("wrong", user["password_hash"])
    # RabbitMQ's own scheme, spelled out: base64(salt + sha256(salt + password))
    assert (
        password_hash("secret", b"\x00\x01\x02\x03")
        == base64.b64encode(
            b"\x00\x01\x02\x03" + hashlib.sha256(b"\x00\x01\x02\x03secret").digest()
        ).decode()
    )


def test_passwords_from_the_environment() -> None:
    plan = plan_access(catalog(), user_prefix="p.")
    assert password_variable("comments-app") == "TRIBUTARY_BROKER_PASSWORD_COMMENTS_APP"
    with pytest.raises(AccessError, match="TRIBUTARY_BROKER_PASSWORD_IDENTITY"):
        passwords(plan, from_env=True, environ={})
    environ = {password_variable(u.role): f"pw-{u.role}" for u in plan.users}
    secrets = passwords(plan, from_env=True, environ=environ)
    assert secrets["p.identity"] == "pw-identity"
    first = definitions(plan, secrets, demo=False)
    second = definitions(plan, secrets, demo=False)
    hashes = [u["password_hash"] for u in first["users"]]
    assert hashes != [u["password_hash"] for u in second["users"]]  # random salts
    assert all(hash_matches(secrets[u["name"]], u["password_hash"]) for u in second["users"])


def test_the_command_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "defs.json"
    args = ["broker", "definitions", "--vhost", "v", "--prefix", "v.", "--out", str(out)]
    assert main([*args, "--name-prefix", ""]) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["vhosts"] == [{"name": "v"}]
    assert {p["vhost"] for p in document["permissions"]} == {"v"}
    assert all(u["name"].startswith("v.") for u in document["users"])
    assert document["queues"] == document["exchanges"] == document["bindings"] == []
    out_text, err = capsys.readouterr()
    assert "demo passwords" in err
    assert f"wrote {out}" in out_text

    assert main(["broker", "definitions", "--passwords-from-env", "--name-prefix", ""]) == 2
    assert "TRIBUTARY_BROKER_PASSWORD_" in capsys.readouterr().err


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@given(encoded=st.text(max_size=64), password=st.text(max_size=16))
def test_any_stored_hash_is_checked_without_error(encoded: str, password: str) -> None:
    assert hash_matches(password, encoded) is (encoded == password_hash(password, _salt(encoded)))


def _salt(encoded: str) -> bytes:
    try:
        return base64.b64decode(encoded, validate=True)[:4]
    except ValueError:
        return b""


@given(
    current=st.dictionaries(
        st.sampled_from(["users", "vhosts", "permissions", "topic_permissions", "other"]), _JSON
    )
)
def test_any_exported_definitions_are_diffed_without_error(current: dict[str, object]) -> None:
    """What the broker exports is foreign input: odd shapes mean "differs", never a crash."""
    plan = plan_access(catalog(), vhost="v")
    secrets = passwords(plan, from_env=False)
    changes, patch = differences(plan, secrets, current)
    # no random hash verifies a password: every user is (re)written, with its permissions
    assert [u["name"] for u in patch["users"]] == [u.name for u in plan.users]
    assert len(patch["permissions"]) == len(plan.users)
    assert set(patch) <= {"users", "vhosts", "permissions", "topic_permissions"}
    assert len(changes) >= 2 * len(plan.users)
