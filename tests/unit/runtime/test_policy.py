"""Policy files: loading, merging (the stricter wins), clear errors, and edits taken in without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamagent.policy import EMPTY, PolicyError, PolicyStore, load_policy

REPO_POLICIES = Path(__file__).resolve().parents[3] / "ops" / "policies"


def test_the_shipped_policies_load() -> None:
    assert load_policy(REPO_POLICIES).version != "none"
    assert load_policy(REPO_POLICIES / "examples").rules  # the examples are valid too


def test_files_merge_and_the_stricter_limit_wins(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[budgets]\nmax_tool_calls = 10\nmax_steps = 8\n[rate_limits]\njira = 5\n")
    (tmp_path / "b.toml").write_text(
        "[budgets]\nmax_tool_calls = 6\n[workflows.w.budgets]\nmax_steps = 4\n[rate_limits]\njira = 2.5\n"
        '[[approvals.rules]]\ntool = "jira"\nenvironments = ["production"]\nreason = "prod"\n'
    )
    policy = load_policy(tmp_path)
    assert (policy.budgets.max_tool_calls, policy.budgets.max_steps) == (6, 8)
    assert policy.budgets_for("w").max_steps == 4 and policy.budgets_for("x").max_steps == 8
    assert policy.rate_limit("jira") == 2.5 and policy.rate_limit("email") is None
    assert policy.approval_reason("jira", {}, None, "production") == "prod"
    assert policy.approval_reason("jira", {}, None, "dev") is None


def test_a_missing_folder_is_no_policy(tmp_path: Path) -> None:
    assert load_policy(tmp_path / "absent") is EMPTY


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ("[budgets]\nmax_tool_calls = -1\n", "budgets.max_tool_calls", "whole number >= 0"),
        ("[budgets]\nmax_calls = 3\n", "budgets.max_calls", "unknown field"),
        ('[[approvals.rules]]\nargument = "to"\n', "approvals.rules[0].tool", "is required"),
        ('[[approvals.rules]]\ntool = "email"\nmatching = "x"\n', "approvals.rules[0].matching", "needs `argument`"),
        (
            '[[approvals.rules]]\ntool = "email"\nargument = "to"\nnot_matching = "(["\n',
            "approvals.rules[0].not_matching",
            "not a valid regular expression",
        ),
        ("[rate_limits]\njira = 0\n", "rate_limits.jira", "> 0"),
        ("[approvals]\ntimeout_s = 'soon'\n", "approvals.timeout_s", "seconds > 0"),
        ("budgets = [", "toml", ""),
    ],
)
def test_a_bad_file_is_refused_with_file_field_and_reason(tmp_path: Path, text: str, where: str, reason: str) -> None:
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path)
    assert caught.value.file.endswith("bad.toml") and caught.value.where == where and reason in caught.value.reason
    assert str(caught.value).startswith(str(tmp_path / "bad.toml"))


def _touch(path: Path, text: str, tick: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(tick * 10**9, tick * 10**9))  # a new mtime even within the file system's granularity


def test_an_edit_is_taken_in_at_the_next_look_and_a_bad_edit_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    _touch(path, "[budgets]\nmax_steps = 5\n", 1)
    store = PolicyStore(tmp_path, reload_s=0)
    first = store.current()
    assert first.budgets.max_steps == 5
    _touch(path, "[budgets]\nmax_steps = 7\n", 2)
    second = store.current()
    assert second.budgets.max_steps == 7 and second.version != first.version
    _touch(path, "[budgets]\nmax_steps = 'many'\n", 3)
    assert store.current() is second and store.failed_reloads == 1
    assert store.current() is second and store.failed_reloads == 1  # the same bad file is not read again
    _touch(path, "[budgets]\nmax_steps = 9\n", 4)
    assert store.current().budgets.max_steps == 9


def test_the_first_load_of_a_bad_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text("[nonsense]\n")
    with pytest.raises(PolicyError):
        PolicyStore(tmp_path)
