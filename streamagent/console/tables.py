"""Tables the command line prints, shared by ``runs`` and the demo."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from datetime import timedelta

from streamagent.config import Settings
from streamagent.events import CANCELLED
from streamagent.processors.projection.processor import telling_arguments
from streamagent.processors.projection.queries import ApprovalRow, RunRow
from streamagent.processors.workflow import WorkflowError, load_workflows


def steps_per_workflow(settings: Settings) -> dict[str, int]:
    """How many steps each workflow has, from the workflow files (empty if they do not load)."""
    try:
        return {name: len(w.steps) for name, w in load_workflows(settings.workflows_dir).items()}
    except WorkflowError:
        return {}


def format_tokens(count: int, *, estimated: bool = False) -> str:
    """``842``, ``12.3k``, ``4.1M``; ``~`` in front when the count is (partly) a local estimate."""
    if count < 10_000:
        text = str(count)
    elif count < 1_000_000:
        text = f"{count / 1000:.1f}k"
    else:
        text = f"{count / 1_000_000:.1f}M"
    return f"~{text}" if estimated else text


def format_cost(cost_usd: float) -> str:
    """Dollars with the digits that matter: a model decision often costs a fraction of a cent."""
    if cost_usd == 0:
        return "$0"
    if cost_usd < 0.0001:  # a tiny model's decision: not rounded to a misleading $0.0000
        return "<$0.0001"
    if cost_usd < 1:
        return f"${cost_usd:.4f}"
    return f"${cost_usd:.2f}"


def has_costs(row: RunRow) -> bool:
    return bool(row.tokens or row.cost_usd or row.model_decisions)


def print_runs_table(rows: Sequence[RunRow], steps_of: Mapping[str, int]) -> None:
    """One line per run; ``steps`` is done/total of the run's workflow (``?`` for a workflow unknown here).

    Tokens and cost columns appear only when some run was decided by a model; the company and workflow
    columns then narrow so that a line still fits in 120 columns."""
    costs = any(has_costs(r) for r in rows)
    company_w, workflow_w = (16, 16) if costs else (24, 20)
    header = (
        f"{'run id':<36}  {'company':<{company_w}} {'workflow':<{workflow_w}} {'status':<10} {'steps':>5}"
        f" {'duration':>9}"
    )
    print(header + (f" {'tokens':>7} {'cost':>8}" if costs else ""))
    for r in rows:
        duration = f"{r.duration_s:.2f}s" if r.duration_s is not None else "-"
        total = steps_of.get(r.workflow or "", "?")
        steps = f"{r.steps_done}/{total}"
        line = (
            f"{r.run_id:<36}  {(r.company_name or '?')[:company_w]:<{company_w}}"
            f" {(r.workflow or '?')[:workflow_w]:<{workflow_w}} {r.status:<10} {steps:>5} {duration:>9}"
        )
        if costs:
            if has_costs(r):
                tokens = format_tokens(r.tokens, estimated=r.estimated_decisions > 0)
                line += f" {tokens:>7} {format_cost(r.cost_usd):>8}"
            else:
                line += f" {'-':>7} {'-':>8}"
        print(line)
        if r.reason and (r.status == "running" or CANCELLED in r.reason):
            # What the run waits for ("waiting for tool crm"), or who cancelled it ("cancelled by ada: ...").
            print(f"{'':<38}{r.reason}")
        if r.parent_run_id:
            print(f"{'':<38}↳ child of {r.parent_run_id} (step {r.parent_step})")


def approval_line(row: ApprovalRow) -> str:
    """What a held step would do and the rule that held it, for one line: ``to=… subject=… — reason``."""
    who = f" ({row.status} by {row.decided_by})" if row.decided_by else ""
    return f"{telling_arguments(row.arguments)} — {row.reason}{who}"


def answer_command(verb: str, run_id: str, step: str, note: str | None = None) -> str:
    """The command line that answers a held step (``verb``: approve or deny), quoted to paste into a shell."""
    words = ["streamagent", verb, run_id, step, *(["--note", note] if note is not None else [])]
    return " ".join(shlex.quote(word) for word in words)


def human_age(delta: timedelta) -> str:
    """A duration as an operator reads it: 45s, 12m, 3h, 2d."""
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
