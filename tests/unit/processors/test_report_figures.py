"""The quality report's arithmetic on hand-made rows (no database), and the projection's per-run
quality signals on the real PostgreSQL: computed from the events, once per run in the metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from streamagent.processors.projection import queries
from streamagent.processors.projection.processor import ProjectionHandler
from streamagent.processors.projection.queries import QualityRow
from streamagent.processors.projection.report import build, failure_reasons, percentile, reason_class
from streamagent.processors.projection.schema import SCHEMA
from test_projection_costs import batch, requested

from streamagent import db
from streamagent.config import Settings
from streamagent.console.report import describe_window, parse_since, render
from streamagent.events import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    DecisionAction,
    DecisionRecorded,
    FailureStatus,
    RunCompleted,
    RunFailed,
    ToolResult,
    ToolStatus,
)

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
UNTIL = T0 + timedelta(hours=1)


def row(n: int, status: str, duration: float | None = None, **fields: object) -> QualityRow:
    return QualityRow.model_validate(
        {
            "run_id": f"run-{n}",
            "workflow": "onboarding",
            "status": status,
            "created_at": T0,
            "duration_s": duration,
            "workflow_steps": 4,
            **fields,
        }
    )


def test_percentiles_interpolate_between_closest_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(map(float, range(1, 21))), 95) == pytest.approx(19.05)
    assert percentile([1.0, 2.0], 100) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_success_rate_percentiles_and_cost_count_only_ended_runs() -> None:
    rows = [
        row(1, "completed", 10.0, tool_calls=4, decisions=5, cost_usd=0.02, tool_attempts=5, retries=1),
        row(2, "completed", 20.0, tool_calls=6, decisions=7, cost_usd=0.04, tool_attempts=6),
        row(3, "completed", 30.0, tool_calls=4, decisions=5, cost_usd=0.03, tool_attempts=4),
        row(4, "failed", 40.0, tool_calls=2, decisions=3, cost_usd=0.03, failed_step="email", reason="x"),
        row(5, "escalated", 50.0, tool_calls=5, guard_refusals=2, approvals=2, approval_waits_s=[3.0, 9.0]),
        row(6, "running", None, tool_calls=0, cost_usd=5.0),  # not counted in anything but runs/running
        row(7, "completed", 60.0, workflow="other", workflow_steps=None, tool_calls=9, prompt_tokens=100),
    ]
    report = build(rows, until=UNTIL)
    t = report.total
    assert (t.runs, t.completed, t.failed, t.escalated, t.running) == (7, 4, 1, 1, 1)
    assert t.success_rate == pytest.approx(4 / 6)
    assert t.duration_p50_s == pytest.approx(35.0)  # of 10, 20, 30, 40, 50, 60
    assert t.duration_p95_s == pytest.approx(57.5)
    assert t.duration_max_s == 60.0
    # Every ended run's cost, charged to the completed ones; the running run's 5 USD is not in it.
    assert t.cost_usd == pytest.approx(0.12)
    assert t.cost_per_completed_usd == pytest.approx(0.03)
    assert (t.tool_calls, t.decisions, t.tool_attempts, t.retries) == (30, 20, 15, 1)
    # Minimum and excess only over runs whose workflow is known (run 7's is not): 5 runs x 4 steps.
    assert (t.min_tool_calls, t.excess_tool_calls) == (20, 2 + 1)
    assert (t.guard_refusals, t.approvals) == (2, 2)
    assert (t.approval_wait_p50_s, t.approval_wait_p95_s) == (6.0, pytest.approx(8.7))
    assert t.prompt_tokens == 100
    assert set(report.workflows) == {"onboarding", "other"}
    assert report.workflows["other"].success_rate == 1.0
    assert report.workflows["onboarding"].runs == 6
    assert report.runs is None and build(rows, until=UNTIL, per_run=True).runs == rows


def test_a_window_without_ended_runs_has_no_rates() -> None:
    report = build([row(1, "running")], until=UNTIL)
    assert report.total.success_rate is None and report.total.cost_per_completed_usd is None
    assert report.total.duration_p50_s is None and report.failure_reasons == []
    assert "no runs" in render(build([], until=UNTIL, since=T0))


def test_alike_failures_group_under_one_reason_most_frequent_first() -> None:
    rows = [
        row(1, "escalated", 1.0, reason="deadline 2026-12-02T09:00:05.123000+00:00 passed before the run finished"),
        row(2, "escalated", 1.0, reason="deadline 2026-12-02T09:07:00+00:00 passed before the run finished"),
        row(3, "escalated", 1.0, reason="deadline 2026-12-02T10:00:00+00:00 passed before the run finished"),
        row(4, "failed", 1.0, failed_step="email", reason="step email failed: 400 recipient rejected"),
        row(5, "failed", 1.0, failed_step="email", reason="step email failed: 400 recipient rejected"),
        row(6, "failed", 1.0, failed_step="jira", reason="step jira failed: a project with key 'ACME7Q2ZXW' exists"),
        row(7, "completed", 1.0, reason="all steps done"),
        row(8, "failed", 1.0, failed_step="enrich", reason=None),
    ]
    reasons = failure_reasons(rows)
    assert [(r.status, r.step, r.runs) for r in reasons] == [
        ("escalated", None, 3),
        ("failed", "email", 2),
        ("failed", "enrich", 1),
        ("failed", "jira", 1),
    ]
    assert reasons[0].reason == "deadline <time> passed before the run finished"
    assert reasons[0].example_run_id == "run-1"
    assert reasons[1].reason == "step email failed: <n> recipient rejected"
    assert reasons[3].reason == "step jira failed: a project with key '<id>' exists"
    assert failure_reasons(rows, top=1) == reasons[:1]
    assert reason_class("command ab12cd34ef lost after 3 re-drives") == "command <id> lost after <n> re-drives"
    text = render(build(rows, until=UNTIL, since=UNTIL - timedelta(hours=24)))
    assert "last 24h" in text and "Top failure reasons:" in text and "   3  escalated: deadline <time>" in text


def test_since_takes_minutes_hours_days() -> None:
    assert parse_since("30m") == timedelta(minutes=30)
    assert parse_since("24h") == timedelta(hours=24)
    assert parse_since(" 7d ") == timedelta(days=7)
    assert (
        describe_window(timedelta(hours=48)) == "2d"
        and describe_window(timedelta(days=1)) == "24h"
        and describe_window(timedelta(minutes=90)) == "90m"
    )
    for bad in ("", "24", "h", "-1h", "0h", "1.5h", "3y", "9999999999999w"):
        with pytest.raises(ValueError):
            parse_since(bad)


# -- the projection stores the signals --------------------------------------------------------------------
RUN = "run-quality"


def _decision(n: int, action: DecisionAction, step: str | None, guard: str | None = None) -> DecisionRecorded:
    return DecisionRecorded(
        event_id=f"dec-{n}",
        guard_outcome=guard,
        run_id=RUN,
        occurred_at=T0 + timedelta(seconds=n),
        decision_id=f"dec-{n}",
        based_on_version=n,
        action=action,
        step=step,
        tool=step,
        reason="next",
        decider="llm:m",
        prompt_tokens=100,
        completion_tokens=10,
        cost_usd=0.001,
    )


def _result(n: int, step: str, attempts: int, status: ToolStatus = ToolStatus.succeeded, **kw: object) -> ToolResult:
    return ToolResult.model_validate(
        {
            "event_id": f"res-{step}-{n}",
            "run_id": RUN,
            "occurred_at": T0 + timedelta(seconds=n),
            "command_id": f"cmd-{step}",
            "tool": step,
            "step": step,
            "status": status,
            "attempts": attempts,
            **kw,
        }
    )


def _counted(status: str) -> float:
    value = REGISTRY.get_sample_value("streamagent_run_outcomes_total", {"workflow": "onboarding", "status": status})
    return value or 0.0


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"workflow": "onboarding"}) or 0.0


def test_the_projection_stores_a_runs_signals_when_it_ends_and_counts_it_once(settings: Settings) -> None:
    db.migrate(settings, SCHEMA)
    projection = ProjectionHandler(settings, steps_of={"onboarding": 4})
    running = [
        requested(RUN),
        _decision(1, DecisionAction.dispatch, "enrich"),
        _result(2, "enrich", 3),
        _result(2, "enrich", 3, event_id="res-enrich-again"),  # published again: one command, counted once
        _decision(3, DecisionAction.dispatch, "jira"),
        _result(4, "jira", 2, ToolStatus.failed, error="409", error_kind="permanent"),
        _decision(5, DecisionAction.escalate, "jira"),
        _decision(6, DecisionAction.compensate, "enrich"),
    ]
    projection(batch(settings, running))
    (before,) = queries.quality(settings)
    assert (before.status, before.workflow_steps, before.tool_calls, before.duration_s) == ("running", 4, 0, None)

    counted, retries, calls = (
        _counted("escalated"),
        _sample("streamagent_run_retries_total"),
        _sample("streamagent_run_tool_calls_total"),
    )
    end = RunFailed(
        event_id="end",
        run_id=RUN,
        occurred_at=T0 + timedelta(seconds=7.5),
        decision_id="dec-5",
        status=FailureStatus.escalated,
        reason="step jira failed: 409",
        failed_step="jira",
    )
    projection(batch(settings, [end]))
    (q,) = queries.quality(settings)
    assert (q.status, q.failed_step, q.duration_s) == ("escalated", "jira", 7.5)
    assert (q.decisions, q.tool_calls, q.tool_attempts, q.retries) == (4, 3, 5, 3)
    assert (q.prompt_tokens, q.completion_tokens, q.cost_usd) == (400, 40, pytest.approx(0.004))
    assert (q.guard_refusals, q.approvals, q.approval_waits_s) == (0, 0, [])
    assert _counted("escalated") == counted + 1
    assert (_sample("streamagent_run_retries_total"), _sample("streamagent_run_tool_calls_total")) == (
        retries + 3,
        calls + 3,
    )

    projection(batch(settings, [end]))  # delivered again: same figures, not counted twice
    assert queries.quality(settings) == [q]
    assert _counted("escalated") == counted + 1

    # A result copied after the run's end (results travel on their own topic) updates the figures.
    projection(batch(settings, [_result(8, "enrich", 2, operation="compensate")]))
    (late,) = queries.quality(settings)
    assert (late.tool_attempts, late.retries) == (7, 4)
    assert _counted("escalated") == counted + 1
    # The metrics add the difference (and only once, however often the late result is delivered).
    projection(batch(settings, [_result(8, "enrich", 2, operation="compensate")]))
    assert (_sample("streamagent_run_retries_total"), _sample("streamagent_run_tool_calls_total")) == (
        retries + 4,
        calls + 3,
    )
    since = queries.quality(settings, since=T0 + timedelta(seconds=1))
    assert since == [] and queries.quality(settings, workflow="other") == []


def test_a_completed_runs_duration_is_request_to_completion(settings: Settings) -> None:
    db.migrate(settings, SCHEMA)
    projection = ProjectionHandler(settings, steps_of={})
    done = RunCompleted(
        event_id="done", run_id=RUN, occurred_at=T0 + timedelta(seconds=2), decision_id="d", reason="all done"
    )
    # The end may be projected before the request (other partition order): the duration follows the request.
    projection(batch(settings, [done]))
    projection(batch(settings, [requested(RUN)]))
    (q,) = queries.quality(settings)
    assert (q.status, q.workflow_steps) == ("completed", None)
    assert q.duration_s == 2.0


def _asked(n: float, step: str, request: str, event_id: str | None = None) -> ApprovalRequested:
    return ApprovalRequested(
        event_id=event_id or f"ask-{request}",
        run_id=RUN,
        occurred_at=T0 + timedelta(seconds=n),
        request_id=request,
        decision_id=f"dec-{request}",
        step=step,
        tool=step,
        arguments_digest="d",
        reason="policy: needs approval",
        policy_version="p1",
        expires_at=T0 + timedelta(hours=1),
    )


def test_guard_refusals_and_approval_waits_come_from_the_governance_events(settings: Settings) -> None:
    db.migrate(settings, SCHEMA)
    projection = ProjectionHandler(settings, steps_of={"onboarding": 4})
    at = T0 + timedelta(seconds=1)
    events = [
        requested(RUN),
        _decision(1, DecisionAction.dispatch, "enrich", guard="allowed"),
        # Held for approval: no command went out, so it is not a tool call.
        _decision(2, DecisionAction.dispatch, "jira", guard="approval"),
        _asked(2, "jira", "r-jira"),
        _asked(2, "jira", "r-jira", event_id="ask-r-jira-again"),  # asked twice: one request
        ApprovalGranted(
            event_id="ok", run_id=RUN, occurred_at=at + timedelta(seconds=4), request_id="r-jira", step="jira", by="ops"
        ),
        _decision(6, DecisionAction.dispatch, "jira", guard="allowed"),
        _decision(7, DecisionAction.dispatch, "email", guard="approval"),
        _asked(7, "email", "r-email"),
        ApprovalDenied(
            event_id="no",
            run_id=RUN,
            occurred_at=T0 + timedelta(seconds=7.25),
            request_id="r-email",
            step="email",
            by="ops",
        ),
        ApprovalExpired(
            event_id="exp", run_id=RUN, occurred_at=T0 + timedelta(seconds=9), request_id="r-email", step="email"
        ),  # after the denial: the first answer is the wait
        _decision(8, DecisionAction.dispatch, "slack", guard="refused"),
        _decision(9, DecisionAction.compensate, "jira"),
        _asked(9, "slack", "r-slack"),  # never answered: an approval without a wait
        RunFailed(
            event_id="end",
            run_id=RUN,
            occurred_at=T0 + timedelta(seconds=10),
            decision_id="dec-9",
            status=FailureStatus.failed,
            reason="approval denied",
            failed_step="email",
        ),
    ]
    projection(batch(settings, events))
    (q,) = queries.quality(settings)
    assert (q.decisions, q.tool_calls, q.guard_refusals) == (6, 3, 1)
    assert (q.approvals, q.approval_waits_s) == (3, [3.0, 0.25])
    assert q.duration_s == 10.0
    figures = build([q], until=UNTIL).total
    assert (figures.approval_wait_p50_s, figures.approval_wait_p95_s) == (pytest.approx(1.625), pytest.approx(2.8625))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["report", "--since", "2x"], "expected a duration such as 30m, 24h or 7d, got '2x'"),
        (["report", "--since", "0h"], "expected a duration such as 30m, 24h or 7d, got '0h'"),
        (["report", "--workflow", " "], "must not be empty"),
    ],
)
def test_a_bad_report_argument_is_one_line_and_exit_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamagent.console import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_runs_that_ended_before_the_quality_columns_get_them_at_start_uncounted(settings: Settings) -> None:
    db.migrate(settings, SCHEMA)
    projection = ProjectionHandler(settings, steps_of={"onboarding": 4})
    end = RunCompleted(
        event_id="done", run_id=RUN, occurred_at=T0 + timedelta(seconds=3), decision_id="dec-3", reason="all done"
    )
    projection(
        batch(
            settings,
            [requested(RUN), _decision(1, DecisionAction.dispatch, "enrich"), _result(2, "enrich", 2), end],
        )
    )
    (projected,) = queries.quality(settings)
    # As an earlier version left it: the run ended, its quality columns at their defaults.
    with db.connect(settings) as conn:
        conn.execute(
            "UPDATE runs SET workflow_steps=NULL, decisions=0, tool_calls=0, tool_attempts=0, retries=0,"
            " duration_s=NULL, quality_counted=false"
        )
    counted = _counted("completed")
    assert ProjectionHandler(settings, steps_of={"onboarding": 4}).backfill_quality(chunk=1) == 1
    assert queries.quality(settings) == [projected]
    assert (projected.workflow_steps, projected.tool_calls, projected.retries, projected.duration_s) == (4, 1, 1, 3.0)
    assert _counted("completed") == counted  # an old run is not counted as if it ended now
    assert ProjectionHandler(settings, steps_of={}).backfill_quality() == 0
