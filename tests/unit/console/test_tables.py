"""What `runs` and the demo print: steps out of the run's own workflow, and what a running run waits for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from streamagent.processors.projection.queries import RunRow

from streamagent.config import Settings
from streamagent.console.tables import print_runs_table, steps_per_workflow

T0 = datetime(2026, 12, 2, tzinfo=UTC)


def row(run_id: str, workflow: str | None, status: str, steps: int, reason: str | None = None) -> RunRow:
    ended = T0 + timedelta(seconds=2) if status != "running" else None
    return RunRow(
        run_id=run_id,
        company_name="Initech",
        workflow=workflow,
        status=status,
        steps_done=steps,
        failed_step=None,
        reason=reason,
        created_at=T0,
        ended_at=ended,
    )


def test_steps_are_counted_against_each_runs_own_workflow(capsys: pytest.CaptureFixture[str]) -> None:
    steps_of = steps_per_workflow(Settings())
    assert steps_of["onboarding"] == 5 and steps_of["onboarding-with-crm"] == 6
    print_runs_table(
        [
            row("r1", "onboarding", "completed", 5),
            row("r2", "onboarding-with-crm", "running", 4, "waiting for tool crm"),
            row("r3", "retired-workflow", "failed", 1),
        ],
        steps_of,
    )
    lines = capsys.readouterr().out.splitlines()
    assert "workflow" in lines[0] and "steps" in lines[0]
    assert lines[1].startswith("r1") and " 5/5 " in lines[1] and "2.00s" in lines[1]
    assert lines[2].startswith("r2") and " 4/6 " in lines[2]
    assert lines[3].strip() == "waiting for tool crm"  # the wait shows under its run
    assert lines[4].startswith("r3") and " 1/? " in lines[4]  # a workflow no file defines any more


def test_a_broken_workflows_folder_leaves_the_table_printable(tmp_path: object) -> None:
    assert steps_per_workflow(Settings(workflows_dir=tmp_path)) == {}


def test_a_child_run_is_marked_with_its_parent_and_show_lists_a_parent_s_children(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from streamagent.console.timeline import family_lines

    child = row("c1", "kyc-check", "completed", 2).model_copy(update={"parent_run_id": "r1", "parent_step": "kyc"})
    print_runs_table([row("r1", "onboarding-kyc", "completed", 6), child], {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("c1") and lines[3].strip() == "↳ child of r1 (step kyc)"
    assert family_lines(child, []) == ["child of r1 (step kyc)"]
    assert family_lines(row("r1", "onboarding-kyc", "completed", 6), [child]) == [
        "children:",
        "  c1  step kyc  kyc-check  status=completed",
    ]


def test_a_cancelled_run_shows_who_cancelled_it_under_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    print_runs_table(
        [
            row("r1", "onboarding", "failed", 2, "cancelled by ada: the client withdrew"),
            row("r2", "onboarding", "failed", 2, "step crm failed: permanent"),  # other endings stay one line
        ],
        {},
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].strip() == "cancelled by ada: the client withdrew" and lines[3].startswith("r2")
    assert len(lines) == 4
