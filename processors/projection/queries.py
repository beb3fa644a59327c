"""Read side: runs and their timelines from the PostgreSQL projection."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from streamagent.processors.projection.causal import causal_order

from streamagent import db
from streamagent.config import Settings


class RunRow(BaseModel):
    run_id: str
    company_name: str | None
    workflow: str | None = None
    status: str
    steps_done: int
    failed_step: str | None
    reason: str | None
    created_at: datetime | None
    ended_at: datetime | None
    # Summed over the run's decisions (zero for a run decided by the rules alone).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    model_decisions: int = 0
    # Decisions whose tokens were counted locally (the endpoint reported no usage): the totals are estimates.
    estimated_decisions: int = 0
    # A child run's parent: the run and the step that started it (None for a run an upstream asked for).
    parent_run_id: str | None = None
    parent_step: str | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def duration_s(self) -> float | None:
        if self.created_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.created_at).total_seconds()


class TimelineEntry(BaseModel):
    occurred_at: datetime
    type: str
    step: str | None
    summary: str
    event_id: str
    causation_id: str | None
    payload: dict[str, Any]


_RUN_COLUMNS = ", ".join(RunRow.model_fields)


def _run_row(row: tuple[Any, ...]) -> RunRow:
    return RunRow.model_validate(dict(zip(RunRow.model_fields, row, strict=True)))


# The order of ``runs`` and the page's list, newest first, and the cursor that pages on through it: the
# runs strictly after ``%(before)s`` (a run id) in that order. ``run_id`` breaks ties of ``created_at``,
# so two runs requested in the same microsecond are neither both shown nor both skipped by a page.
_NEWEST_FIRST = "ORDER BY created_at DESC NULLS LAST, run_id DESC"
_BEFORE = (
    "(%(before)s::text IS NULL OR (created_at, run_id) <"
    " (SELECT created_at, run_id FROM runs WHERE run_id = %(before)s))"
)


def runs(settings: Settings, status: str | None = None, limit: int = 1000, before: str | None = None) -> list[RunRow]:
    """The newest runs first, like ``git log``: ``limit`` keeps the newest; ``before`` (a run id) pages on,
    to the runs requested before that one."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    with db.connect(settings) as conn:
        rows = conn.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE (%(status)s::text IS NULL OR status = %(status)s)"
            f" AND {_BEFORE} {_NEWEST_FIRST} LIMIT %(limit)s",
            {"status": status, "limit": limit, "before": before},
        ).fetchall()
    return [_run_row(row) for row in rows]


# A run id may be given by any unique prefix this long (the page shows 8 characters).
MIN_PREFIX = 6


class AmbiguousRun(ValueError):
    """A run id prefix that more than one run has; ``candidates`` are some of them, newest first."""

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        super().__init__(f"{prefix!r} is the start of {len(candidates)}{'+' if len(candidates) > 10 else ''} run ids")
        self.prefix = prefix
        self.candidates = candidates[:10]


def resolve_run(settings: Settings, text: str) -> str | None:
    """The run id that ``text`` names: the id itself, or the one run whose id starts with it (at least
    ``MIN_PREFIX`` characters); None if no run; ``AmbiguousRun`` if several."""
    with db.connect(settings) as conn:
        if conn.execute("SELECT 1 FROM runs WHERE run_id = %s", (text,)).fetchone():
            return text
        if len(text) < MIN_PREFIX:
            return None
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        found = [
            run_id
            for (run_id,) in conn.execute(
                "SELECT run_id FROM runs WHERE run_id LIKE %s ORDER BY created_at DESC, run_id DESC LIMIT 11",
                (escaped + "%",),
            )
        ]
    if len(found) > 1:
        raise AmbiguousRun(text, found)
    return found[0] if found else None


# What the page's search box matches, as a case-insensitive substring: ids, names, addresses, reasons.
_SEARCHED = ("run_id", "company_name", "company_domain", "contact_email", "requested_by", "workflow", "reason")


def search_runs(
    settings: Settings, status: str | None = None, text: str | None = None, limit: int = 200, before: str | None = None
) -> list[RunRow]:
    """The newest runs first (the page's list), optionally of one status and matching ``text``; ``before``
    (a run id) pages on as in ``runs``."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    pattern = None
    if text and text.strip():
        escaped = text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
    matches = " OR ".join(f"{column} ILIKE %(pattern)s" for column in _SEARCHED)
    with db.connect(settings) as conn:
        rows = conn.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE (%(status)s::text IS NULL OR status = %(status)s)"
            f" AND (%(pattern)s::text IS NULL OR {matches}) AND {_BEFORE} {_NEWEST_FIRST} LIMIT %(limit)s",
            {"status": status, "pattern": pattern, "limit": limit, "before": before},
        ).fetchall()
    return [_run_row(row) for row in rows]


def count_by_status(settings: Settings) -> dict[str, int]:
    """How many runs each status has, over the whole table."""
    with db.connect(settings) as conn:
        rows = conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    return {status: int(count) for status, count in rows}


def run(settings: Settings, run_id: str) -> RunRow | None:
    with db.connect(settings) as conn:
        row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    return _run_row(row) if row else None


def runs_by_id(settings: Settings, run_ids: list[str]) -> dict[str, RunRow]:
    """The rows of those of ``run_ids`` that exist, by id."""
    with db.connect(settings) as conn:
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ANY(%s)", (run_ids,)).fetchall()
    return {r.run_id: r for r in map(_run_row, rows)}


def children(settings: Settings, run_id: str) -> list[RunRow]:
    """The child runs ``run_id``'s steps started, oldest first."""
    with db.connect(settings) as conn:
        rows = conn.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE parent_run_id = %s ORDER BY created_at, run_id", (run_id,)
        ).fetchall()
    return [_run_row(row) for row in rows]


def timeline(settings: Settings, run_id: str) -> list[TimelineEntry]:
    """The run's events, each after the event that caused it (``causal.causal_order``); unrelated events
    by time, then as projected (a topic partition's offsets are the order its events were written in)."""
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT occurred_at, type, step, summary, event_id, causation_id, payload FROM run_events"
            " WHERE run_id = %s ORDER BY occurred_at, recorded_at, kafka_offset, event_id",
            (run_id,),
        ).fetchall()
    fields = list(TimelineEntry.model_fields)
    return causal_order([TimelineEntry.model_validate(dict(zip(fields, row, strict=True))) for row in rows])


def status_counts(settings: Settings, run_ids: list[str]) -> dict[str, int]:
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM runs WHERE run_id = ANY(%s) GROUP BY status", (run_ids,)
        ).fetchall()
    return {status: int(count) for status, count in rows}


class QualityRow(BaseModel):
    """One run's quality signals (``streamagent report``), as the projection stored them.

    The counts are computed from the run's events once it has ended; a running run has its status,
    workflow and times, and zeros elsewhere.
    """

    run_id: str
    workflow: str | None = None
    status: str
    failed_step: str | None = None
    reason: str | None = None
    created_at: datetime | None = None
    ended_at: datetime | None = None
    duration_s: float | None = None
    # The steps of the run's workflow: the fewest commands a run of it can take (None: workflow unknown).
    workflow_steps: int | None = None
    decisions: int = 0
    # Commands dispatched (steps and undos), counted from the decisions that dispatched them.
    tool_calls: int = 0
    # External call attempts of the run's results, and those beyond the first (retries).
    tool_attempts: int = 0
    retries: int = 0
    guard_refusals: int = 0
    approvals: int = 0
    approval_waits_s: list[float] = []
    stale_memory: int = 0
    memory_after_effect: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


QUALITY_COLUMNS = ", ".join(QualityRow.model_fields)


def quality_row(row: tuple[Any, ...]) -> QualityRow:
    return QualityRow.model_validate(dict(zip(QualityRow.model_fields, row, strict=True)))


def quality(settings: Settings, since: datetime | None = None, workflow: str | None = None) -> list[QualityRow]:
    """The quality signals of the runs requested at or after ``since`` (all runs: None), of one workflow
    or all: one query, the figures are aggregated by ``report.build``."""
    with db.connect(settings) as conn:
        rows = conn.execute(
            f"SELECT {QUALITY_COLUMNS} FROM runs"
            " WHERE (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
            " AND (%(workflow)s::text IS NULL OR workflow = %(workflow)s)"
            " ORDER BY created_at NULLS LAST, run_id",
            {"since": since, "workflow": workflow},
        ).fetchall()
    return [quality_row(row) for row in rows]


class ApprovalRow(BaseModel):
    request_id: str
    run_id: str
    step: str
    tool: str
    arguments: dict[str, Any]
    reason: str
    policy_version: str
    status: str
    requested_at: datetime
    expires_at: datetime
    decided_by: str | None
    note: str | None
    decided_at: datetime | None


_APPROVAL_COLUMNS = ", ".join(ApprovalRow.model_fields)


def approvals(settings: Settings, *, pending: bool = True, run_id: str | None = None) -> list[ApprovalRow]:
    """Approval requests, oldest first: the pending ones, or all (of one run)."""
    with db.connect(settings) as conn:
        rows = conn.execute(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE (NOT %(pending)s OR status = 'requested')"
            " AND (%(run)s::text IS NULL OR run_id = %(run)s) ORDER BY requested_at, request_id",
            {"pending": pending, "run": run_id},
        ).fetchall()
    fields = list(ApprovalRow.model_fields)
    return [ApprovalRow.model_validate(dict(zip(fields, row, strict=True))) for row in rows]
