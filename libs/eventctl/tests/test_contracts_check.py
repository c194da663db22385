"""``eventctl contracts check`` end to end, on a throwaway git repository.

The repository starts from a copy of the real ``contracts/`` directory, so the checker also
proves that the real schemas compare clean against themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tributary.contracts.catalog import load_catalog
from tributary.eventctl.cli import main

REAL_CONTRACTS = Path(__file__).resolve().parents[3] / "contracts"
USER_CREATED_V1 = Path("contracts/schemas/user.created.v1.json")

# Used only when the real schema is not there (yet): the shape the catalog describes.
_FALLBACK_USER_CREATED_V1: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["user_id", "email", "name"],
    "properties": {
        "user_id": {"type": "string"},
        "email": {"type": "string", "format": "email", "x-pii": True},
        "name": {"type": "string", "x-pii": True},
    },
}


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    proc = subprocess.run(
        ["git", "-C", str(repo), "-c", "commit.gpgsign=false", *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return proc.stdout.strip()


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository on ``main`` whose single commit holds a copy of the real contracts."""
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "repo"
    shutil.copytree(REAL_CONTRACTS, path / "contracts")
    schema = path / USER_CREATED_V1
    if not schema.is_file():
        schema.parent.mkdir(parents=True, exist_ok=True)
        schema.write_text(json.dumps(_FALLBACK_USER_CREATED_V1, indent=2), encoding="utf-8")
    git(path, "init", "-q", "-b", "main")
    commit_all(path, "contracts")
    return path


def edit_schema(repo: Path, rel: Path, change: Any) -> None:
    path = repo / rel
    schema = json.loads(path.read_text(encoding="utf-8"))
    change(schema)
    path.write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")


def remove_email(schema: dict[str, Any]) -> None:
    del schema["properties"]["email"]
    if "email" in schema.get("required", []):
        schema["required"].remove("email")


def add_optional_property(schema: dict[str, Any]) -> None:
    schema["properties"]["referral_code"] = {"type": "string", "maxLength": 32}


def versions_with_schemas(contracts: Path) -> int:
    return sum(1 for v in load_catalog(contracts).versions() if v.schema_path.is_file())


@pytest.mark.parametrize("committed", [False, True], ids=["working-tree", "committed"])
def test_removing_a_required_field_fails(
    repo: Path, committed: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    if not committed:  # the branch has moved on; the edit is still uncommitted
        (repo / "README.md").write_text("Tributary\n", encoding="utf-8")
        commit_all(repo, "readme")
    edit_schema(repo, USER_CREATED_V1, remove_email)
    if committed:
        commit_all(repo, "drop email")

    assert main(["contracts", "check", "--repo", str(repo)]) == 1

    err = capsys.readouterr().err
    assert "user.created v1: data.email: property removed (property_removed)" in err
    assert "email" in err


def test_adding_an_optional_property_passes(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    edit_schema(repo, USER_CREATED_V1, add_optional_property)
    commit_all(repo, "add referral code")

    assert main(["contracts", "check", "--repo", str(repo)]) == 0

    out, err = capsys.readouterr()
    assert err == ""
    compared = versions_with_schemas(repo / "contracts")
    assert compared > 0
    assert out.startswith("contracts OK")
    assert f"{compared} version(s) compared" in out


def test_a_first_commit_without_changes_passes(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["contracts", "check", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "contracts OK" in out
    assert "no base revision" in out


def test_on_main_the_working_tree_is_compared_with_the_previous_commit(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "README.md").write_text("Tributary\n", encoding="utf-8")
    commit_all(repo, "readme")
    edit_schema(repo, USER_CREATED_V1, remove_email)

    assert main(["contracts", "check", "--repo", str(repo)]) == 1
    assert "data.email" in capsys.readouterr().err


def test_against_an_explicit_ref_from_the_current_directory(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_schema(repo, USER_CREATED_V1, remove_email)
    monkeypatch.chdir(repo / "contracts" / "schemas")

    assert main(["contracts", "check", "--against", "HEAD"]) == 1
    assert "(property_removed)" in capsys.readouterr().err

    assert main(["contracts", "check", "--against", "no-such-ref"]) == 2
    assert "no-such-ref" in capsys.readouterr().err


def test_a_contracts_dir_elsewhere_is_read_at_the_same_path_in_the_base(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "api").mkdir()
    git(repo, "mv", "contracts", "api/contracts")
    commit_all(repo, "move contracts")
    (repo / "README.md").write_text("Tributary\n", encoding="utf-8")
    commit_all(repo, "readme")
    edit_schema(repo, Path("api") / USER_CREATED_V1, remove_email)
    contracts = repo / "api" / "contracts"

    args = ["contracts", "check", "--repo", str(repo), "--contracts", str(contracts)]
    assert main(args) == 1
    assert "data.email: property removed" in capsys.readouterr().err


def test_runs_as_a_module(repo: Path) -> None:
    edit_schema(repo, USER_CREATED_V1, remove_email)
    proc = subprocess.run(
        [sys.executable, "-m", "tributary.eventctl", "contracts", "check", "--against", "HEAD"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "data.email: property removed" in proc.stderr


def test_a_change_of_senders_needs_review_and_fails_only_when_asked(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = repo / "contracts" / "catalog.yaml"
    text = catalog.read_text(encoding="utf-8")
    email_send = (
        "  email.send:\n    kind: command\n    owner: notification\n    senders: [notification]"
    )
    assert email_send in text
    catalog.write_text(
        text.replace(email_send, email_send.replace("[notification]", "[notification, identity]")),
        encoding="utf-8",
    )

    assert main(["contracts", "check", "--repo", str(repo), "--against", "HEAD"]) == 0
    out, err = capsys.readouterr()
    assert "needs review: email.send: senders: may now be published by identity" in err
    assert "(producers_changed)" in err
    assert "1 change(s) to review" in out

    args = ["contracts", "check", "--repo", str(repo), "--against", "HEAD", "--fail-on-review"]
    assert main(args) == 1
    assert "1 contract change(s) to review against HEAD" in capsys.readouterr().err
