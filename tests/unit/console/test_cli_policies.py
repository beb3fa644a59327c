"""`streamagent policies check`, and a malformed policy file refused at the start of `up` and of a tool:
one line naming the file, the field and the reason, exit 2, no traceback, nothing started."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TEST_APPROVAL_KEYS, TEST_COMMAND_KEYS

from streamagent.config import get_settings
from streamagent.console.cli import main

GOOD = """
description = "test"
[budgets]
max_tool_calls = 6
[workflows.onboarding.budgets]
max_steps = 9
[[approvals.rules]]
tool = "email"
argument = "to"
not_matching = '@example\\.com$'
reason = "mail outside example.com"
[rate_limits]
jira = 2.5
"""
BAD = '[rate_limits]\njira = "fast"\n'


@pytest.fixture
def policies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "policies"
    folder.mkdir()
    monkeypatch.setenv("STREAMAGENT_POLICIES_DIR", str(folder))
    monkeypatch.setenv("STREAMAGENT_DATA_DIR", str(tmp_path / "data"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    get_settings.cache_clear()
    yield folder
    get_settings.cache_clear()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_policies_check_prints_the_policy_in_force(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policies / "main.toml").write_text(GOOD)
    assert main(["policies", "check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok  policy ") and f"from {policies.resolve()} (environment dev)" in out
    assert f"file {policies / 'main.toml'}" in out
    assert "budgets: max_tool_calls=6" in out
    assert "budgets of workflow onboarding: max_steps=9" in out
    assert "tool=email argument=to not_matching='@example\\\\.com$': mail outside example.com" in out
    assert "[main.toml approvals.rules[0]]" in out
    assert "rate limits (per tool process): jira=2.5/s" in out


@pytest.mark.parametrize("command", [["policies", "check"], ["up"], ["tool", "enrich"]])
def test_a_malformed_policy_is_one_line_with_file_field_and_reason(
    policies: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    (policies / "main.toml").write_text(GOOD)
    (policies / "typo.toml").write_text(BAD)
    # What a tool needs before it reads policy (nothing answers at these addresses: nothing is contacted).
    for name, value in {
        "BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "SANDBOX_URL": "http://127.0.0.1:1",
        "COMMAND_KEYS": TEST_COMMAND_KEYS.replace("\n", ";"),
        "APPROVAL_KEYS": TEST_APPROVAL_KEYS.replace("\n", ";"),
    }.items():
        if command != ["up"]:  # `up` starts what is unset; a set address must answer
            monkeypatch.setenv(f"STREAMAGENT_{name}", value)
    get_settings.cache_clear()
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert err.strip() == (
        f"streamagent {' '.join(command[:1] if command[0] != 'policies' else command)}: error: invalid policy:"
        f" {policies / 'typo.toml'}: rate_limits.jira: must be calls per second > 0, not 'fast'"
    )
    assert "Traceback" not in out + err and not out.startswith("ok")
    assert not (policies.parent / "data" / "stack.json").exists()  # `up` started nothing


def test_a_tool_without_an_approval_key_does_not_start(
    policies: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "SANDBOX_URL": "http://127.0.0.1:1",
        "COMMAND_KEYS": TEST_COMMAND_KEYS.replace("\n", ";"),
    }.items():
        monkeypatch.setenv(f"STREAMAGENT_{name}", value)
    get_settings.cache_clear()
    assert main(["tool", "enrich"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamagent tool: error: no approval key: ") and "STREAMAGENT_APPROVAL_KEYS_FILE" in err


def test_the_stack_creates_its_approval_key_file_once_and_hands_children_the_path(tmp_path: Path) -> None:
    from streamagent.approval import load_approval_keys
    from streamagent.config import Settings, settings_from, to_env
    from streamagent.console.devstack.stack import approval_keys_settings
    from streamagent.signing import load_keys

    settings = Settings(data_dir=tmp_path)
    updates = approval_keys_settings(settings)
    path = tmp_path / "approval-keys"
    assert updates == {"approval_keys_file": path}
    assert (path.stat().st_mode & 0o777) == 0o600
    assert path.read_text().startswith("# approval token keys")
    first = load_approval_keys(settings).signer
    assert approval_keys_settings(settings) == updates  # kept: tokens minted earlier still verify
    child = settings_from(to_env(settings.model_copy(update=updates)))
    assert child.approval_keys_file == path and load_approval_keys(child).signer == first
    assert first.secret.get_secret_value() not in str(to_env(settings.model_copy(update=updates)))
    with pytest.raises(Exception, match="no command signing key"):  # a key set of its own, not the command keys
        load_keys(settings)
    given = Settings(data_dir=tmp_path / "other", approval_keys="k " + "x" * 40)  # type: ignore[arg-type]
    assert approval_keys_settings(given) == {} and not (tmp_path / "other").exists()
