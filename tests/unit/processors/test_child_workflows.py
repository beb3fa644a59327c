"""Child workflows: a step that names a workflow starts a child run, and the child's end answers the step."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamagent.processors.workflow import WorkflowError, load_workflows

PARENT = """name = "parent"
goal = "hand a check to a child"
tools = ["lookup"]

[[steps]]
name = "look"
tool = "lookup"

[[steps]]
name = "check"
workflow = "child"
needs = ["look"]
args.size = "{steps.look.output.size | default: 0}"
"""

CHILD = """name = "child"
goal = "check"
tools = ["lookup"]

[[steps]]
name = "look"
tool = "lookup"
"""


def _folder(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


def test_a_step_may_name_a_workflow_instead_of_a_tool(tmp_path: Path) -> None:
    workflows = load_workflows(_folder(tmp_path, parent=PARENT, child=CHILD))
    step = workflows["parent"].step("check")
    assert step.workflow == "child" and step.tool == "workflow:child" and step.needs == ("look",)


@pytest.mark.parametrize(
    ("parent", "child", "where", "reason"),
    [
        (
            PARENT.replace('workflow = "child"', 'workflow = "child"\ntool = "lookup"'),
            CHILD,
            "steps.check.tool",
            "exactly one",
        ),
        (PARENT.replace('workflow = "child"\n', ""), CHILD, "steps.check.tool", "exactly one"),
        (
            PARENT.replace('workflow = "child"', 'workflow = "ghost"'),
            CHILD,
            "steps.check.workflow",
            "unknown workflow 'ghost'",
        ),
        (PARENT.replace('workflow = "child"', 'workflow = "Child Flow"'), CHILD, "steps.check.workflow", "lowercase"),
        (PARENT.replace('workflow = "child"', 'workflow = "parent"'), CHILD, "steps.check.workflow", "cycle"),
        (
            PARENT,
            CHILD + '\n[[steps]]\nname = "back"\nworkflow = "parent"\n',
            "steps.",
            "a cycle of child workflows",
        ),
    ],
    ids=["both", "neither", "unknown", "bad-name", "self", "cycle"],
)
def test_a_bad_child_step_is_refused_naming_file_and_step(
    tmp_path: Path, parent: str, child: str, where: str, reason: str
) -> None:
    _folder(tmp_path, parent=parent, child=child)
    with pytest.raises(WorkflowError) as info:
        load_workflows(tmp_path)
    assert where in info.value.where and reason in info.value.reason
    assert info.value.file.endswith((".toml",))


def test_the_reference_workflows_load_with_their_child() -> None:
    from streamagent.processors.workflow import default_workflows

    workflows = default_workflows()
    kyc = workflows["onboarding-kyc"].step("kyc")
    assert kyc.workflow == "kyc-check" and "kyc-check" in workflows
    assert workflows["onboarding-kyc"].max_parallel == 3
