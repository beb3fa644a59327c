"""Submitting requests: validation before anything is produced, JSON-lines files, and the CLI parser."""

from __future__ import annotations

import argparse
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamagent.config import get_settings
from streamagent.console.cli import build_parser, main
from streamagent.events import RunRequested
from streamagent.submit import InvalidRequest, build_request, read_jsonl

VALID: dict[str, Any] = {
    "company_name": "Acme Robotics",
    "company_domain": "acme-robotics.io",
    "contact_name": "Ada Lovelace",
    "contact_email": "ada@acme-robotics.io",
    "goal": "onboard new client",
    "requested_by": "crm",
}
FLAGS: dict[str, str] = {
    "company_name": "--company-name",
    "company_domain": "--company-domain",
    "contact_name": "--contact-name",
    "contact_email": "--contact-email",
    "requested_by": "--requested-by",
    "deadline_s": "--deadline-s",
}


# -- build_request -----------------------------------------------------------------------------------
def test_build_request_makes_a_run_requested_with_a_new_run_id() -> None:
    first = build_request({**VALID, "run_id": None, "deadline_s": None})
    second = build_request(dict(VALID))
    assert isinstance(first, RunRequested)
    assert first.company_domain == "acme-robotics.io"
    assert first.deadline_s is None
    assert uuid.UUID(first.run_id) and uuid.UUID(second.run_id)
    assert first.run_id != second.run_id


def test_build_request_keeps_a_given_run_id_and_deadline() -> None:
    request = build_request({**VALID, "run_id": "run-7", "deadline_s": 30.0, "company_domain": " Acme.IO "})
    assert (request.run_id, request.deadline_s, request.company_domain) == ("run-7", 30.0, "acme.io")


@pytest.mark.parametrize(
    ("changes", "bad"),
    [
        pytest.param({"contact_email": "not-an-email"}, ["contact_email"], id="email"),
        pytest.param({"contact_email": "ada@"}, ["contact_email"], id="email-no-domain"),
        pytest.param({"company_domain": "localhost"}, ["company_domain"], id="domain-without-dot"),
        pytest.param({"company_domain": "acme_robotics.io"}, ["company_domain"], id="domain-bad-chars"),
        pytest.param({"company_name": None}, ["company_name"], id="missing-name"),
        pytest.param({"company_name": ""}, ["company_name"], id="empty-name"),
        pytest.param({"requested_by": None}, ["requested_by"], id="missing-requested-by"),
        pytest.param({"deadline_s": -5.0}, ["deadline_s"], id="negative-deadline"),
        pytest.param(
            {"contact_email": "nope", "company_domain": "nodot", "contact_name": None},
            ["contact_email", "company_domain", "contact_name"],
            id="several",
        ),
    ],
)
def test_invalid_fields_are_each_named_with_their_flag(changes: dict[str, Any], bad: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        build_request({**VALID, **changes})
    message = str(info.value)
    for name in bad:
        assert f"{name} ({FLAGS[name]})" in message
    for name in set(FLAGS) - set(bad):
        assert f"{name} (" not in message
    assert message.count(";") == len(bad) - 1


def test_domain_error_says_what_a_domain_looks_like() -> None:
    with pytest.raises(InvalidRequest, match=r"company_domain \(--company-domain\): .*DNS domain"):
        build_request({**VALID, "company_domain": "localhost"})


def test_unknown_fields_are_named_as_fields_not_as_flags() -> None:
    with pytest.raises(InvalidRequest, match=r"^colour: not a request field$"):
        build_request({**VALID, "colour": "blue"})


# -- read_jsonl --------------------------------------------------------------------------------------
def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_jsonl_reads_every_line_in_order(tmp_path: Path) -> None:
    lines = [json.dumps({**VALID, "run_id": f"run-{i}"}) for i in range(3)]
    requests, skipped = read_jsonl(_write(tmp_path / "ok.jsonl", [lines[0], "", "   ", lines[1], lines[2]]))
    assert skipped == []
    assert [r.run_id for r in requests] == ["run-0", "run-1", "run-2"]
    assert all(isinstance(r, RunRequested) for r in requests)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        pytest.param(
            json.dumps({**VALID, "contact_email": "nope"}), r"line 3: contact_email: value is not", id="email"
        ),
        pytest.param(json.dumps({**VALID, "company_domain": "nodot"}), r"line 3: company_domain", id="domain"),
        pytest.param("{not json", r"line 3: not JSON", id="not-json"),
        pytest.param("[1, 2]", r"line 3: a line must hold a JSON object", id="array"),
    ],
)
def test_one_bad_line_is_named_and_nothing_is_read(tmp_path: Path, bad_line: str, expected: str) -> None:
    good = json.dumps(VALID)
    path = _write(tmp_path / "mixed.jsonl", [good, "", bad_line, good])
    with pytest.raises(InvalidRequest, match=expected) as info:
        read_jsonl(path)
    message = str(info.value)
    assert "line 1" not in message and "line 4" not in message


def test_skip_invalid_keeps_the_good_lines_and_names_the_bad_ones(tmp_path: Path) -> None:
    lines = ["{", json.dumps(VALID), json.dumps({**VALID, "colour": "red"}), json.dumps(VALID)]
    requests, skipped = read_jsonl(_write(tmp_path / "mixed.jsonl", lines), skip_invalid=True)
    assert len(requests) == 2
    assert skipped == [
        "line 1: not JSON (Expecting property name enclosed in double quotes)",
        "line 3: colour: not a request field",
    ]


def test_every_bad_line_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", ["{", json.dumps(VALID), json.dumps({**VALID, "contact_email": "x"})])
    with pytest.raises(InvalidRequest) as info:
        read_jsonl(path)
    assert str(info.value).splitlines()[0].startswith("line 1: not JSON")
    assert str(info.value).splitlines()[1].startswith("line 3: contact_email")


# -- the CLI -----------------------------------------------------------------------------------------
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
    root.handlers[:] = handlers  # main() configures logging for the process
    root.setLevel(level)


def _submit_args(**fields: str) -> list[str]:
    values = {**VALID, **fields}
    args = ["submit"]
    for name, value in values.items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def test_the_fixture_points_settings_at_the_unroutable_broker(unroutable: None) -> None:
    assert get_settings().bootstrap_servers == "127.0.0.1:1"


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("fields", "flags"),
    [
        ({"contact_email": "not-an-email"}, ["--contact-email"]),
        ({"company_domain": "localhost"}, ["--company-domain"]),
        ({"contact_email": "x@", "company_domain": "nodot"}, ["--contact-email", "--company-domain"]),
    ],
)
def test_cli_submit_refuses_invalid_flags_before_touching_kafka(
    unroutable: None, capsys: pytest.CaptureFixture[str], fields: dict[str, str], flags: list[str]
) -> None:
    assert main(_submit_args(**fields)) == 2
    out, err = capsys.readouterr()
    assert "nothing was submitted" in err
    for flag in flags:
        assert flag in err
    assert out == ""  # no run id printed


@pytest.mark.timeout(20)
def test_cli_submit_refuses_missing_flags(unroutable: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--company-name", "Acme", "--company-domain", "acme.io"]) == 2
    err = capsys.readouterr().err
    for flag in ("--contact-name", "--contact-email", "--requested-by"):
        assert flag in err
    assert "--company-name" not in err and "--company-domain" not in err


@pytest.mark.timeout(20)
def test_cli_submit_file_with_a_bad_line_submits_nothing(
    unroutable: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = json.dumps(VALID)
    path = _write(tmp_path / "requests.jsonl", [good, json.dumps({**VALID, "contact_email": "bad"}), good])
    assert main(["submit", "--file", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "line 2: contact_email" in err
    assert "nothing was submitted" in err
    assert out == ""


@pytest.mark.timeout(20)
def test_cli_submit_missing_file_is_an_error(
    unroutable: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["submit", "--file", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl" in capsys.readouterr().err


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, (*prefix, name))
    return paths


COMMAND_PATHS = _command_paths(build_parser())


def test_every_documented_command_is_in_the_parser() -> None:
    expected = {
        ("demo",),
        ("up",),
        ("submit",),
        ("show",),
        ("runs",),
        ("topics",),
        ("topics", "create"),
        ("processor",),
        ("tool",),
        ("dlq",),
        ("dlq", "list"),
        ("dlq", "replay"),
        ("sandbox",),
        ("sandbox", "effects"),
        ("sandbox", "faults"),
    }
    assert expected <= set(COMMAND_PATHS)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "streamagent")
def test_help_of_every_command_exits_0(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: streamagent" + "".join(f" {p}" for p in path))


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.timeout(20)
def test_cli_submit_file_with_flags_is_refused(
    unroutable: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _write(tmp_path / "r.jsonl", [json.dumps(VALID)])
    assert main(["submit", "--file", str(path), "--company-name", "Ignored Inc", "--workflow", "onboarding"]) == 2
    err = capsys.readouterr().err
    assert "--company-name, --workflow cannot go with it" in err and err.strip().count("\n") == 0
    assert main(["submit", *_submit_args()[1:], "--skip-invalid"]) == 2
    assert "--skip-invalid goes with --file" in capsys.readouterr().err


@pytest.mark.timeout(20)
def test_cli_submit_skip_invalid_with_no_valid_line_submits_nothing(
    unroutable: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _write(tmp_path / "bad.jsonl", ["{", json.dumps({**VALID, "colour": "red"})])
    assert main(["submit", "--file", str(path), "--skip-invalid"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing produced: the broker is unroutable, producing would hang
    assert "skipped line 1: not JSON" in err and "skipped line 2: colour: not a request field" in err
    assert "no valid request" in err
