"""A request names its workflow: `submit --workflow`, JSON lines, `workflows check`, refusals before producing."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamagent.config import get_settings
from streamagent.console.cli import main
from streamagent.submit import InvalidRequest, build_request, read_jsonl

VALID: dict[str, Any] = {
    "company_name": "Acme Robotics",
    "company_domain": "acme-robotics.io",
    "contact_name": "Ada Lovelace",
    "contact_email": "ada@acme-robotics.io",
    "requested_by": "crm",
}


@pytest.fixture
def unroutable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A broker address nothing answers on: producing would hang until the test times out."""
    monkeypatch.setenv("STREAMAGENT_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("STREAMAGENT_DATA_DIR", str(tmp_path / "data"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    root.handlers[:] = handlers
    root.setLevel(level)


def _flags(**fields: str) -> list[str]:
    args = ["submit"]
    for name, value in {**VALID, **fields}.items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def test_build_request_takes_a_workflow_and_refuses_an_unknown_one() -> None:
    assert build_request(VALID).workflow == "onboarding"
    assert build_request({**VALID, "workflow": "onboarding"}, {"onboarding"}).workflow == "onboarding"
    with pytest.raises(InvalidRequest) as info:
        build_request({**VALID, "workflow": "nope"}, {"onboarding"})
    assert str(info.value) == "workflow (--workflow): unknown workflow 'nope' (known: onboarding)"


def test_json_lines_name_their_workflow(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(
        "\n".join([json.dumps({**VALID, "workflow": "onboarding"}), json.dumps({**VALID, "workflow": "x"})])
    )
    with pytest.raises(InvalidRequest, match=r"^line 2: workflow: unknown workflow 'x'"):
        read_jsonl(path, {"onboarding"})
    path.write_text(json.dumps(VALID))
    assert [r.workflow for r in read_jsonl(path, {"onboarding"})[0]] == ["onboarding"]


@pytest.mark.timeout(20)
def test_cli_submit_refuses_an_unknown_workflow_in_one_line_before_producing(
    unroutable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_flags(workflow="no-such-flow")) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no run id: nothing was produced (the broker is unroutable; producing would hang)
    assert err.strip().count("\n") == 0
    assert "nothing was submitted" in err
    known = "kyc-check, onboarding, onboarding-kyc, onboarding-parallel, onboarding-with-crm"
    assert f"unknown workflow 'no-such-flow' (known: {known})" in err


@pytest.mark.timeout(20)
def test_cli_submit_file_naming_an_unknown_workflow_submits_nothing(
    unroutable: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(VALID) + "\n" + json.dumps({**VALID, "workflow": "ghost"}) + "\n")
    assert main(["submit", "--file", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "line 2: workflow: unknown workflow 'ghost'" in err


def test_workflows_check_lists_the_workflows(unroutable: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workflows", "check"]) == 0
    assert (
        "ok  onboarding: enrich(enrich) -> jira(jira) -> draft(draft) -> email(email) -> slack(slack)"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("command", [["workflows", "check"], _flags()])
def test_a_malformed_workflow_is_refused_in_one_line_with_file_field_and_reason(
    unroutable: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: list[str],
) -> None:
    folder = tmp_path / "workflows"
    folder.mkdir()
    bad = folder / "broken.toml"
    bad.write_text('name = "broken"\ngoal = "g"\ntools = ["a"]\n[[steps]]\nname = "s"\ntool = "b"\n')
    monkeypatch.setenv("STREAMAGENT_WORKFLOWS_DIR", str(folder))
    get_settings.cache_clear()
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert f"invalid workflow: {bad}: steps.s.tool: tool 'b' is not in the workflow's tools (a)" in err
    assert "Traceback" not in err


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["state", "decision"])
def test_a_processor_refuses_a_malformed_workflow_at_start(
    unroutable: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "broken.toml").write_text('name = "broken"\ngoal = ""\ntools = ["a"]\n')
    monkeypatch.setenv("STREAMAGENT_WORKFLOWS_DIR", str(folder))
    monkeypatch.setenv("STREAMAGENT_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/down")
    get_settings.cache_clear()
    assert main(["processor", name]) == 2
    err = capsys.readouterr().err
    assert f"streamagent processor: error: invalid workflow: {folder / 'broken.toml'}: steps: is required\n" in err
    assert "Traceback" not in err
