"""`streamagent new tool NAME [--dir DIR]`: writes the package, or refuses with one line and writes nothing.
(That the package passes its own test once installed: tests/integration/test_tool_package.py.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamagent.config import get_settings
from streamagent.console import cli


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("STREAMAGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_the_package_into_name_tool_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["new", "tool", "hr-directory"], capsys)
    assert (code, err) == (0, "")
    root = tmp_path / "hr-directory-tool"
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == [
        "README.md",
        "pyproject.toml",
        "src/hr_directory_tool/__init__.py",
        "src/hr_directory_tool/tool.py",
        "tests/test_hr_directory_tool.py",
        "workflows/hr-directory-example.toml",
    ]
    assert "class HrDirectory(Tool[HrDirectoryInput, HrDirectoryOutput])" in (root / written[3]).read_text()
    assert "streamagent tool hr-directory" in out
    assert not (tmp_path / ".streamagent").exists()  # no log folder left where the user stands


def test_dir_puts_it_elsewhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, _err = run(["new", "tool", "tickets", "--dir", str(tmp_path / "pkgs" / "t")], capsys)
    assert code == 2  # pkgs/ does not exist
    (tmp_path / "pkgs").mkdir()
    code, _out, err = run(["new", "tool", "tickets", "--dir", str(tmp_path / "pkgs" / "t")], capsys)
    assert (code, err) == (0, "")
    assert (tmp_path / "pkgs" / "t" / "src" / "tickets_tool" / "tool.py").is_file()


REFUSED = [
    (["new", "tool", "Tickets"], "invalid tool name 'Tickets'"),
    (["new", "tool", "9lives"], "starting with a letter"),
    (["new", "tool", "has_underscore"], "lowercase letters, digits and single '-'"),
    (["new", "tool", "trailing-"], "invalid tool name"),
    (["new", "tool", "a" * 41], "1-40"),
    (["new", "tool", "crm"], "a tool named 'crm' exists already (streamagent.tools.crm)"),
    (["new", "tool", "mcp"], "is a command of its own"),
    (["new", "tool", "ok", "--dir", "/nonexistent-parent/ok"], "/nonexistent-parent is not a folder"),
    (["new", "tool"], "the following arguments are required: name"),
    (["new"], "required"),
]


@pytest.mark.parametrize(("argv", "needle"), REFUSED, ids=[" ".join(a)[:40] for a, _ in REFUSED])
def test_a_bad_name_or_place_is_one_line_and_nothing_is_written(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == ""
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and lines[0].startswith("streamagent new"), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_refused_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tickets-tool").mkdir()
    (tmp_path / "tickets-tool" / "mine.txt").write_text("keep")
    code, _out, err = run(["new", "tool", "tickets"], capsys)
    assert code == 2 and err.strip() == (
        "streamagent new tool: error: tickets-tool exists already: give a new folder with --dir"
    )
    assert [p.name for p in (tmp_path / "tickets-tool").iterdir()] == ["mine.txt"]
