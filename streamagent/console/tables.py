"""Tables the command line prints, shared by ``runs`` and the demo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from streamagent.config import Settings
from streamagent.processors.projection.queries import RunRow
from streamagent.processors.workflow import WorkflowError, load_workflows


def steps_per_workflow(settings: Settings) -> dict[str, int]:
    """How many steps each workflow has, from the workflow files (empty if they do not load)."""
    try:
        return {name: len(w.steps) for name, w in load_workflows(settings.workflows_dir).items()}
    except WorkflowError:
        return {}


def print_runs_table(rows: Sequence[RunRow], steps_of: Mapping[str, int]) -> None:
    """One line per run; ``steps`` is done/total of the run's workflow (``?`` for a workflow unknown here)."""
    print(f"{'run id':<36}  {'company':<24} {'workflow':<20} {'status':<10} {'steps':>5} {'duration':>9}")
    for r in rows:
        duration = f"{r.duration_s:.2f}s" if r.duration_s is not None else "-"
        total = steps_of.get(r.workflow or "", "?")
        steps = f"{r.steps_done}/{total}"
        print(
            f"{r.run_id:<36}  {(r.company_name or '?')[:24]:<24} {(r.workflow or '?')[:20]:<20} {r.status:<10}"
            f" {steps:>5} {duration:>9}"
        )
        if r.status == "running" and r.reason:
            print(f"{'':<38}{r.reason}")  # what the run waits for, e.g. "waiting for tool crm"
