"""The quality report: runs' stored signals aggregated the way one reports on an API's reliability.

Pure functions of ``queries.QualityRow`` lists, so the arithmetic is tested without a database.
Definitions (also in docs/operations/quality-report.md):

- success rate: completed ÷ ended (completed + failed + escalated); running runs are not counted in it,
  nor cancelled ones (an operator withdrew them: neither a success nor a failure of the workflow).
- duration percentiles: over ended runs, request to end, interpolated between the closest ranks
  (PostgreSQL's ``percentile_cont``, numpy's default).
- cost per completed run: the model cost of every ended run ÷ completed runs, so what failed runs
  burnt is charged to the runs that delivered (an API's "cost per successful request").
- excess tool calls: commands a run dispatched beyond its workflow's step count (undos included).
- failure reasons: ended-but-not-completed runs grouped by status, failed step and reason, with the
  reason's run-specific parts (times, ids, keys, numbers) replaced so that alike failures group.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime

from pydantic import BaseModel
from streamagent.processors.projection.queries import QualityRow

ENDED = ("completed", "failed", "escalated", "cancelled")
TOP_REASONS = 5


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


_VARIABLE_PARTS = (
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ][0-9:.]+(?:[+-]\d{2}:\d{2}|Z)?"), "<time>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I), "<id>"),
    (re.compile(r"\b(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{6,}\b"), "<id>"),  # keys, hashes: long and with digits
    (re.compile(r"\b\d+(?:\.\d+)?\b"), "<n>"),
)


def reason_class(reason: str | None) -> str:
    """A failure reason without its run-specific parts, so that alike failures group together."""
    if not reason:
        return "(no reason recorded)"
    text = " ".join(reason.split())
    for pattern, placeholder in _VARIABLE_PARTS:
        text = pattern.sub(placeholder, text)
    return text


class FailureReason(BaseModel):
    status: str
    step: str | None
    reason: str
    runs: int
    example_run_id: str


class Figures(BaseModel):
    """The figures of one group of runs (one workflow, or all)."""

    runs: int
    completed: int
    failed: int
    escalated: int
    running: int
    cancelled: int = 0
    success_rate: float | None  # None: no run has ended
    duration_p50_s: float | None
    duration_p95_s: float | None
    duration_max_s: float | None
    cost_usd: float
    cost_per_completed_usd: float | None  # None: no run completed
    prompt_tokens: int
    completion_tokens: int
    decisions: int
    tool_calls: int
    # The workflows' minimum over the ended runs of a known workflow, and the calls beyond it.
    min_tool_calls: int
    excess_tool_calls: int
    tool_attempts: int
    retries: int
    guard_refusals: int
    approvals: int
    approval_wait_p50_s: float | None
    approval_wait_p95_s: float | None
    # Shared memory: commands not executed because what they were decided on changed (decided again), and
    # changes that arrived after a step's effect (the effect kept, the change recorded).
    stale_memory: int = 0
    memory_after_effect: int = 0


class Report(BaseModel):
    since: datetime | None
    until: datetime
    workflow: str | None
    total: Figures
    workflows: dict[str, Figures]
    failure_reasons: list[FailureReason]
    runs: list[QualityRow] | None = None


def figures(rows: Iterable[QualityRow]) -> Figures:
    rows = list(rows)
    ended = [r for r in rows if r.status in ENDED]
    statuses = Counter(r.status for r in rows)
    completed = statuses["completed"]
    durations = [r.duration_s for r in ended if r.duration_s is not None]
    waits = [w for r in ended for w in r.approval_waits_s]
    cost = sum(r.cost_usd for r in ended)
    known = [r for r in ended if r.workflow_steps is not None]
    return Figures(
        runs=len(rows),
        completed=completed,
        failed=statuses["failed"],
        escalated=statuses["escalated"],
        cancelled=statuses["cancelled"],
        running=len(rows) - len(ended),
        success_rate=completed / decided if (decided := len(ended) - statuses["cancelled"]) else None,
        duration_p50_s=percentile(durations, 50),
        duration_p95_s=percentile(durations, 95),
        duration_max_s=max(durations, default=None),
        cost_usd=cost,
        cost_per_completed_usd=cost / completed if completed else None,
        prompt_tokens=sum(r.prompt_tokens for r in ended),
        completion_tokens=sum(r.completion_tokens for r in ended),
        decisions=sum(r.decisions for r in ended),
        tool_calls=sum(r.tool_calls for r in ended),
        min_tool_calls=sum(r.workflow_steps or 0 for r in known),
        excess_tool_calls=sum(max(0, r.tool_calls - (r.workflow_steps or 0)) for r in known),
        tool_attempts=sum(r.tool_attempts for r in ended),
        retries=sum(r.retries for r in ended),
        guard_refusals=sum(r.guard_refusals for r in ended),
        approvals=sum(r.approvals for r in ended),
        approval_wait_p50_s=percentile(waits, 50),
        approval_wait_p95_s=percentile(waits, 95),
        stale_memory=sum(r.stale_memory for r in ended),
        memory_after_effect=sum(r.memory_after_effect for r in ended),
    )


def failure_reasons(rows: Iterable[QualityRow], top: int = TOP_REASONS) -> list[FailureReason]:
    """The most frequent reasons runs failed or escalated, most frequent first (ties: by name)."""
    groups: dict[tuple[str, str | None, str], list[str]] = {}
    for r in rows:
        if r.status in ENDED and r.status != "completed":
            groups.setdefault((r.status, r.failed_step, reason_class(r.reason)), []).append(r.run_id)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0][0], item[0][1] or "", item[0][2]))
    return [
        FailureReason(status=status, step=step, reason=reason, runs=len(ids), example_run_id=ids[0])
        for (status, step, reason), ids in ordered[:top]
    ]


def build(
    rows: Sequence[QualityRow],
    until: datetime,
    since: datetime | None = None,
    workflow: str | None = None,
    per_run: bool = False,
    top: int = TOP_REASONS,
) -> Report:
    by_workflow: dict[str, list[QualityRow]] = {}
    for r in rows:
        by_workflow.setdefault(r.workflow or "unknown", []).append(r)
    return Report(
        since=since,
        until=until,
        workflow=workflow,
        total=figures(rows),
        workflows={name: figures(group) for name, group in sorted(by_workflow.items())},
        failure_reasons=failure_reasons(rows, top),
        runs=list(rows) if per_run else None,
    )
