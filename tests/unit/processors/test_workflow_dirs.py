"""STREAMAGENT_WORKFLOWS_DIR may name several folders (os.pathsep-separated): every workflow of every
folder is loaded, one name declared twice is refused naming both files, and every loader reads them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from streamagent.processors.workflow import WorkflowError, load_workflows

from streamagent.config import DEFAULT_WORKFLOWS_DIR, Settings, settings_from


def _folder(root: Path, name: str, *workflows: str) -> Path:
    folder = root / name
    folder.mkdir()
    for workflow in workflows:
        shutil.copy(DEFAULT_WORKFLOWS_DIR / f"{workflow}.toml", folder / f"{workflow}.toml")
    return folder


def test_several_folders_are_read_in_order(tmp_path: Path) -> None:
    ours = _folder(tmp_path, "ours", "onboarding-with-crm")
    shipped = _folder(tmp_path, "shipped", "onboarding")
    found = load_workflows(f"{ours}{os.pathsep}{shipped}")
    assert list(found) == ["onboarding-with-crm", "onboarding"]
    assert found["onboarding-with-crm"].source == str(ours / "onboarding-with-crm.toml")
    assert found["onboarding"].source == str(shipped / "onboarding.toml")


def test_a_workflow_named_in_two_folders_is_refused_naming_both_files(tmp_path: Path) -> None:
    first = _folder(tmp_path, "first", "onboarding")
    second = _folder(tmp_path, "second", "onboarding")
    with pytest.raises(WorkflowError) as info:
        load_workflows(f"{first}{os.pathsep}{second}")
    message = str(info.value)
    assert message == (
        f"{second / 'onboarding.toml'}: name: workflow 'onboarding' is declared in {first / 'onboarding.toml'} already"
    )


def test_a_missing_folder_or_an_empty_entry_is_refused(tmp_path: Path) -> None:
    ours = _folder(tmp_path, "ours", "onboarding")
    with pytest.raises(WorkflowError, match=f"^{tmp_path / 'absent'}: workflows_dir: is not a directory$"):
        load_workflows(f"{ours}{os.pathsep}{tmp_path / 'absent'}")
    with pytest.raises(WorkflowError, match="has an empty entry"):
        load_workflows(f"{ours}{os.pathsep}")
    with pytest.raises(WorkflowError, match="holds no"):
        load_workflows(f"{_folder(tmp_path, 'empty')}{os.pathsep}{_folder(tmp_path, 'empty2')}")


def test_the_setting_carries_several_folders_to_child_processes(tmp_path: Path) -> None:
    value = f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"
    settings = settings_from({"STREAMAGENT_WORKFLOWS_DIR": value})
    assert str(settings.workflows_dir) == value
    assert Settings(workflows_dir=value).workflows_dir == settings.workflows_dir


LOADERS = [
    "processors/state/app.py",
    "processors/decision/processor.py",
    "processors/intake/processor.py",
    "processors/projection/processor.py",
    "streamagent/console/cli.py",
    "streamagent/console/replay/rebuild.py",
    "streamagent/console/replay/decisions.py",
    "streamagent/console/ui/api.py",
    "streamagent/console/tables.py",
]


def test_every_loader_reads_workflows_through_load_workflows_of_the_setting() -> None:
    """No process reads workflow files its own way (a glob of one folder would miss the other folders)."""
    root = Path(__file__).resolve().parents[3]
    for relative in LOADERS:
        text = (root / relative).read_text()
        assert "load_workflows(" in text and "workflows_dir" in text, relative
    everywhere = [*root.joinpath("processors").rglob("*.py"), *root.joinpath("streamagent").rglob("*.py")]
    globbing = [p for p in everywhere if '.glob("*.toml")' in p.read_text() and p.name != "workflow.py"]
    assert [p.relative_to(root) for p in globbing if "policy" not in p.name] == []
