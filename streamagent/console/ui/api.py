"""What the page's JSON endpoints answer, built from the projection's rows and the dead-letter topic.

The views are pure functions of rows (unit-tested without a database); ``Source`` is the one place
that reads PostgreSQL and Kafka. Every event type is rendered from its generic fields (type, time,
step, summary, payload), so an event type added later shows on the page without a change here; the
known types only get extra, structured details.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamagent.config import Settings
from streamagent.console.timeline import ChatMessage, DecisionCost, ModelContext, tool_model_cost
from streamagent.console.timeline import _text as text_of  # the same text `show --context` prints
from streamagent.console.ui.approvals import approvals_view
from streamagent.processors.projection import queries
from streamagent.processors.projection.queries import RunRow, TimelineEntry
from streamagent.processors.workflow import WorkflowError, load_workflows

Status = Literal["running", "completed", "failed", "escalated", "cancelled"]
STATUSES: tuple[str, ...] = ("running", "completed", "failed", "escalated", "cancelled")
# Reading the dead-letter topic means reading it whole; a page that refreshes every second reuses the
# last read for this long instead of re-reading the topic on every refresh.
DLQ_CACHE_S = 5.0


class ApiError(Exception):
    """An answer other than 200: its HTTP status and a one-line message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Runs per page of the page's list; ``?page_size=N`` in the page's address asks for another size.
PAGE_SIZE = 50


class RunsQuery(BaseModel):
    """``/api/runs?status=&q=&limit=&before=``: ``before`` (a run id, or a prefix ``streamagent runs
    --before`` would take) pages on to the runs listed after that one, as ``git log`` does."""

    model_config = ConfigDict(extra="forbid")

    status: Status | None = None
    q: str | None = Field(None, max_length=200)
    limit: int = Field(200, ge=1, le=1000)
    before: str | None = Field(None, max_length=200)


def parse_runs_query(params: Mapping[str, str]) -> RunsQuery:
    cleaned = {k: v for k, v in params.items() if v != ""}  # an empty filter box means no filter
    try:
        return RunsQuery.model_validate(cleaned)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error["loc"]) or "query"
        raise ApiError(400, f"{where}: {error['msg']}") from None


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def run_summary(row: RunRow, steps_of: Mapping[str, int]) -> dict[str, Any]:
    data = row.model_dump(mode="json")
    data["steps_total"] = steps_of.get(row.workflow or "")
    data["duration_s"] = row.duration_s
    return data


def runs_view(
    rows: Sequence[RunRow], counts: Mapping[str, int], steps_of: Mapping[str, int], more: bool = False
) -> dict[str, Any]:
    """A page of runs; ``next_before`` is the cursor of the next page (None: this page is the last)."""
    return {
        "runs": [run_summary(row, steps_of) for row in rows],
        "next_before": rows[-1].run_id if more and rows else None,
        "counts": {status: int(counts.get(status, 0)) for status in (*STATUSES, *sorted(set(counts) - set(STATUSES)))},
        "at": datetime.now(UTC).isoformat(),
    }


def _message(message: ChatMessage) -> dict[str, Any]:
    extra = dict(message.model_extra or {})
    return {
        "role": message.role,
        "name": extra.get("name") if isinstance(extra.get("name"), str) else None,
        "content": text_of(message.content) if message.content is not None else "",
        "tool_calls": text_of(extra["tool_calls"]) if extra.get("tool_calls") else None,
    }


def decision_details(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A decision's cost and, for a model's decision, the messages it saw and what it answered."""
    try:
        cost = DecisionCost.model_validate(payload)
    except ValidationError:
        cost = DecisionCost()
    details: dict[str, Any] = {
        "decider": cost.decider,
        "prompt_tokens": cost.prompt_tokens,
        "completion_tokens": cost.completion_tokens,
        "cost_usd": cost.cost_usd,
        "tokens_estimated": cost.estimated,
        "by_model": cost.by_model,
        "messages": [],
        "answers": [],
        "other": {},
        # The guard's verdict on the proposal (allowed | approval | refused), when the event carries one.
        "guard": {
            "outcome": payload.get("guard_outcome"),
            "reason": payload.get("guard_reason"),
            "policy_version": payload.get("policy_version"),
        }
        if payload.get("guard_outcome")
        else None,
    }
    try:
        context = ModelContext.model_validate(cost.context)
    except ValidationError:  # a shape this version does not know: shown as it is
        details["other"] = dict(cost.context)
        return details
    details["messages"] = [_message(m) for m in context.messages]
    answers = [*context.answers, *([context.answer] if context.answer is not None else [])]
    details["answers"] = [text_of(a) for a in answers]
    details["other"] = {k: v for k, v in (context.model_extra or {}).items()}
    return details


# What a step shows while a person's approval is asked for or answered (events named, not imported:
# the page shows them from the projection's rows whichever version wrote them).
_APPROVAL_STATUS = {
    "ApprovalRequested": "awaiting approval",
    "ApprovalGranted": "approved",
    "ApprovalDenied": "denied",
    "ApprovalExpired": "approval expired",
}


def _new_step(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "status": "pending",
        "attempts": None,
        "sent": 0,
        "started_at": None,
        "ended_at": None,
        "duration_ms": None,
        "last_call_ms": None,
        "tool": None,
        "undo": None,
    }


def _ms(delta: timedelta) -> int:
    return round(delta.total_seconds() * 1000)


def step_progress(workflow_steps: Sequence[str], entries: Sequence[TimelineEntry]) -> list[dict[str, Any]]:
    """Each step of the run's workflow (then any other step its events name) with how it went so far:
    pending, awaiting approval (then approved, denied or approval expired), running (a command is out),
    succeeded or failed. A compensation (``operation`` other than execute) does not change that; it is
    noted in ``undo``.

    The figures are the step's, not one execution's: ``duration_ms`` runs from the step's first command
    to its final result (a held step's wait for a person comes before its first command, so it is not
    counted). A result's own ``duration_ms`` covers only the tool's last execution of the command: a tool
    that restarted, or waited out an outage, claims the command afresh and starts that clock again, so
    after a 39 s outage it can say 31 ms; it is kept as ``last_call_ms``. ``attempts`` is the result's
    count, which the tool keeps in its ledger across restarts; ``sent`` is how many times the command
    was sent (the decision's command, then each re-drive of a lost one)."""
    steps: dict[str, dict[str, Any]] = {name: _new_step(name) for name in workflow_steps}
    first_command: dict[str, datetime] = {}
    for e in entries:
        if e.step and e.type in _APPROVAL_STATUS:  # a person's gate on the step: waiting, or answered
            approval = steps.setdefault(e.step, _new_step(e.step))
            if approval["status"] in ("pending", *_APPROVAL_STATUS.values()):
                approval["status"] = _APPROVAL_STATUS[e.type]
            continue
        if e.step and e.type == "CommandResent":
            steps.setdefault(e.step, _new_step(e.step))["sent"] += 1
            continue
        if not e.step or e.type not in ("ToolCommand", "ToolResult"):
            continue
        step = steps.setdefault(e.step, _new_step(e.step))
        step["tool"] = e.payload.get("tool", step["tool"])
        operation = str(e.payload.get("operation") or "execute")
        if operation != "execute":
            status = "running" if e.type == "ToolCommand" else str(e.payload.get("status", "?"))
            step["undo"] = f"{operation} {status}"
        elif e.type == "ToolCommand":
            step["sent"] += 1
            first_command.setdefault(e.step, e.occurred_at)
            step["started_at"] = _iso(first_command[e.step])
            if step["status"] in ("pending", "approved"):
                step["status"] = "running"
        else:
            step["status"] = str(e.payload.get("status", "?"))
            step["attempts"] = e.payload.get("attempts")
            step["last_call_ms"] = e.payload.get("duration_ms")
            step["ended_at"] = _iso(e.occurred_at)
            began = first_command.get(e.step)
            # A result without its command in the timeline (not projected yet): no span to tell.
            step["duration_ms"] = max(0, _ms(e.occurred_at - began)) if began is not None else None
    return list(steps.values())


def timeline_entry(entry: TimelineEntry, start: datetime | None) -> dict[str, Any]:
    data = entry.model_dump(mode="json")
    data["offset_ms"] = round((entry.occurred_at - start).total_seconds() * 1000) if start else 0
    if entry.type == "DecisionRecorded":
        data["decision"] = decision_details(entry.payload)
    elif entry.type == "ToolResult" and tool_model_cost(entry.payload) is not None:
        # A model-backed tool's prompt and answer, shown as a decision's are.
        data["model"] = decision_details({**entry.payload, "context": entry.payload["model_context"]})
        data["model"]["decider"] = f"tool {entry.payload.get('tool')}"
    return data


def run_view(
    row: RunRow,
    entries: Sequence[TimelineEntry],
    steps_of: Mapping[str, int],
    workflow_steps: Sequence[str],
    children: Sequence[RunRow] = (),
) -> dict[str, Any]:
    start = entries[0].occurred_at if entries else None
    return {
        "run": run_summary(row, steps_of),
        # The child runs its steps started (the run's own parent link is in ``run``).
        "children": [run_summary(c, steps_of) for c in children],
        "steps": step_progress(workflow_steps, entries),
        "timeline": [timeline_entry(e, start) for e in entries],
        "at": datetime.now(UTC).isoformat(),
    }


class Source:
    """Reads for the endpoints: the projection in PostgreSQL, the workflows, the dead-letter topic."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._dlq_lock = threading.Lock()
        self._dlq: tuple[float, list[dict[str, Any]]] | None = None

    def _workflows(self) -> dict[str, list[str]]:
        try:
            workflows = load_workflows(self.settings.workflows_dir)
        except WorkflowError:
            return {}
        return {name: [s.name for s in w.steps] for name, w in workflows.items()}

    def runs(self, query: RunsQuery) -> dict[str, Any]:
        before = self._cursor(query.before) if query.before else None
        # One run more than the page holds: whether an older page exists, without a query of its own.
        rows = queries.search_runs(self.settings, query.status, query.q, query.limit + 1, before)
        steps_of = {name: len(steps) for name, steps in self._workflows().items()}
        more = len(rows) > query.limit
        return runs_view(rows[: query.limit], queries.count_by_status(self.settings), steps_of, more)

    def _cursor(self, given: str) -> str:
        """The run id ``before`` names, resolved as the CLI's ``runs --before`` resolves it."""
        try:
            found = queries.resolve_run(self.settings, given)
        except queries.AmbiguousRun as exc:
            raise ApiError(400, f"before: {exc}") from None
        if found is None:
            raise ApiError(400, f"before: no run {given}")
        return found

    def approvals(self) -> dict[str, Any]:
        rows = queries.approvals(self.settings)
        runs = queries.runs_by_id(self.settings, sorted({r.run_id for r in rows})) if rows else {}
        return approvals_view(rows, runs, datetime.now(UTC))

    def run(self, run_id: str) -> dict[str, Any]:
        row = queries.run(self.settings, run_id)
        if row is None:
            raise ApiError(404, f"no run {run_id}")
        workflows = self._workflows()
        steps_of = {name: len(steps) for name, steps in workflows.items()}
        entries = queries.timeline(self.settings, run_id)
        children = queries.children(self.settings, run_id)
        return run_view(row, entries, steps_of, workflows.get(row.workflow or "", []), children)

    def dead_letters(self) -> dict[str, Any]:
        if not self.settings.bootstrap_servers:
            raise ApiError(503, "no Kafka broker configured (STREAMAGENT_BOOTSTRAP_SERVERS): dead letters unknown")
        with self._dlq_lock:  # one read of the topic at a time; the others wait for its answer
            now = time.monotonic()
            if self._dlq is None or now - self._dlq[0] > DLQ_CACHE_S:
                from streamagent.dlq_ops import read_dead_letters

                letters = [letter.summary() for letter in read_dead_letters(self.settings, timeout_s=5.0)]
                letters.reverse()  # newest first, as the runs
                self._dlq = (time.monotonic(), letters)
            read_at, letters = self._dlq
        return {"dead_letters": letters, "read_s_ago": round(time.monotonic() - read_at, 1)}
