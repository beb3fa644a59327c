"""The fold: a run's events, applied in order, give its state (pure, no I/O)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from streamagent.processors.state.fold import Applied, RunState, Unprocessable, apply
from streamagent.processors.workflow import ONBOARDING

from streamagent import events
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    Event,
    FailureStatus,
    RunCompleted,
    RunDeadlineExceeded,
    RunFailed,
    RunRequested,
    RunStatus,
    StepStatus,
    ToolResult,
    ToolStatus,
)

RUN = "run-0001"
# The id the decision processor gives the enrich step's command: a result read before its decision
# must carry it (the fold takes no result for a command the run would not send).
CMD_E = events.command_id(RUN, "enrich")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DEFAULT_DEADLINE_S = 600.0
STEPS = ("enrich", "jira", "draft", "email", "slack")
_seq = itertools.count(1)


def _at() -> datetime:
    return T0 + timedelta(seconds=next(_seq))


def requested(event_id: str = "req-1", deadline_s: float | None = 45.0, run_id: str = RUN) -> RunRequested:
    return RunRequested(
        event_id=event_id,
        run_id=run_id,
        occurred_at=T0,
        company_name="Acme Robotics",
        company_domain="acme-robotics.io",
        contact_name="Ada Lovelace",
        contact_email="ada@acme-robotics.io",
        requested_by="crm",
        deadline_s=deadline_s,
        labels={"tier": "gold"},
    )


def decision(
    action: DecisionAction,
    step: str | None = None,
    command_id: str | None = None,
    decision_id: str | None = None,
    event_id: str | None = None,
    version: int = 1,
) -> DecisionRecorded:
    decision_id = decision_id or f"dec-{action.value}-{step}-{next(_seq)}"
    return DecisionRecorded(
        event_id=event_id or decision_id,
        run_id=RUN,
        occurred_at=_at(),
        decision_id=decision_id,
        based_on_version=version,
        action=action,
        step=step,
        tool=step,
        command_id=command_id,
        reason=f"{action.value} {step}",
        decider="rules",
    )


def dispatch(step: str, command_id: str | None = None, decision_id: str | None = None) -> DecisionRecorded:
    return decision(DecisionAction.dispatch, step, command_id or events.command_id(RUN, step), decision_id)


def result(
    step: str,
    command_id: str | None = None,
    ok: bool = True,
    output: dict[str, Any] | None = None,
    error: str | None = None,
    error_kind: str | None = None,
    event_id: str | None = None,
    operation: str = "execute",
) -> ToolResult:
    return ToolResult(
        event_id=event_id or f"res-{step}-{next(_seq)}",
        run_id=RUN,
        occurred_at=_at(),
        command_id=command_id or events.command_id(RUN, step, operation),
        tool=step,
        step=step,
        operation=operation,
        status=ToolStatus.succeeded if ok else ToolStatus.failed,
        output=output if output is not None else {"step": step},
        error=error,
        error_kind=error_kind,
    )


def fold(events: Iterable[Event], state: RunState | None = None) -> RunState:
    for event in events:
        state = apply(state, event, DEFAULT_DEADLINE_S).state
    assert state is not None
    return state


def started() -> RunState:
    return fold([requested()])


def full_run() -> list[Event]:
    """A whole successful run, as the log holds it (each decision before its result)."""
    events: list[Event] = [requested()]
    for step in STEPS:
        events += [dispatch(step), result(step, output={"from": step})]
    events.append(decision(DecisionAction.complete))
    events.append(RunCompleted(run_id=RUN, occurred_at=_at(), decision_id="dec-done", reason="every step"))
    return events


# -- start -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("deadline_s", "expected"), [(45.0, 45.0), (0.5, 0.5), (None, DEFAULT_DEADLINE_S)])
def test_run_requested_creates_version_1_with_pending_steps(deadline_s: float | None, expected: float) -> None:
    event = requested(deadline_s=deadline_s)
    applied = apply(None, event, DEFAULT_DEADLINE_S)
    snap = applied.state.snapshot
    assert applied.changed is True
    assert snap.version == 1
    assert snap.run_id == RUN
    assert snap.status is RunStatus.running
    assert [s.name for s in snap.steps] == list(ONBOARDING.step_names) == list(STEPS)
    assert all(s.status is StepStatus.pending and s.command_id is None for s in snap.steps)
    assert snap.created_at == snap.updated_at == T0
    assert snap.deadline_at == T0 + timedelta(seconds=expected)
    assert snap.deadline_exceeded is False
    assert snap.last_event_id == "req-1"
    assert snap.request.company_domain == "acme-robotics.io"
    assert snap.request.contact_email == "ada@acme-robotics.io"
    assert snap.request.labels == {"tier": "gold"}
    assert applied.state.applied == ["req-1"]


def test_default_deadline_comes_from_the_caller() -> None:
    snap = apply(None, requested(deadline_s=None), 30.0).state.snapshot
    assert snap.deadline_at == T0 + timedelta(seconds=30)


# -- versions and idempotence ------------------------------------------------------------------------
def test_every_applied_event_bumps_the_version_by_exactly_one() -> None:
    events = full_run()
    state: RunState | None = None
    for expected_version, event in enumerate(events, start=1):
        applied = apply(state, event, DEFAULT_DEADLINE_S)
        assert applied.changed is True
        assert applied.state.snapshot.version == expected_version
        assert applied.state.snapshot.last_event_id == event.event_id
        assert applied.state.snapshot.updated_at == event.occurred_at
        state = applied.state
    assert state is not None
    assert state.applied == [e.event_id for e in events]


def _scenario_events() -> dict[str, tuple[list[Event], Event]]:
    """Event kinds, each with the history it is applied on."""
    return {
        "run-requested": ([], requested()),
        "dispatch": ([requested()], dispatch("enrich")),
        "result": ([requested(), dispatch("enrich")], result("enrich")),
        "failed-result": ([requested(), dispatch("enrich")], result("enrich", ok=False, error="x")),
        "complete": ([requested()], decision(DecisionAction.complete)),
        "run-completed": ([requested()], RunCompleted(run_id=RUN, decision_id="d", reason="r")),
        "run-failed": (
            [requested()],
            RunFailed(run_id=RUN, decision_id="d", status=FailureStatus.failed, reason="r"),
        ),
        "deadline": ([requested()], RunDeadlineExceeded(run_id=RUN, deadline_at=T0)),
    }


@pytest.mark.parametrize("kind", list(_scenario_events()))
def test_the_same_event_applied_twice_is_a_no_op(kind: str) -> None:
    history, event = _scenario_events()[kind]
    before = fold(history) if history else None
    once = apply(before, event, DEFAULT_DEADLINE_S)
    assert once.changed is True
    twice = apply(once.state, event, DEFAULT_DEADLINE_S)
    assert twice == Applied(once.state, changed=False)
    assert twice.state.snapshot.version == once.state.snapshot.version


def test_a_redelivered_result_under_a_new_event_id_changes_nothing_but_the_version() -> None:
    state = fold([requested(), dispatch("enrich"), result("enrich", output={"industry": "Software"})])
    again = apply(state, result("enrich", output={"industry": "Other"}), DEFAULT_DEADLINE_S).state
    assert again.snapshot.version == state.snapshot.version + 1
    assert again.snapshot.steps == state.snapshot.steps
    assert again.snapshot.step("enrich").output == {"industry": "Software"}


# -- decisions ---------------------------------------------------------------------------------------
def test_dispatch_decision_marks_the_step_dispatched() -> None:
    state = fold([requested(), dispatch("jira", "cmd-j", "dec-j")])
    snap = state.snapshot
    step = snap.step("jira")
    assert step.status is StepStatus.dispatched
    assert step.command_id == "cmd-j"
    assert step.decision_id == "dec-j"
    assert step.attempts == 1
    assert all(snap.step(name).status is StepStatus.pending for name in ("enrich", "email", "slack"))
    assert snap.superseded_decisions == 0
    assert snap.status is RunStatus.running


@pytest.mark.parametrize("second_command", ["cmd-other", "cmd-first"])
def test_a_second_dispatch_of_a_dispatched_step_is_superseded(second_command: str) -> None:
    state = fold([requested(), dispatch("enrich", "cmd-first", "dec-1")])
    later = fold([dispatch("enrich", second_command, "dec-2")], state)
    step = later.snapshot.step("enrich")
    assert later.snapshot.superseded_decisions == 1
    assert (step.command_id, step.decision_id, step.attempts) == ("cmd-first", "dec-1", 1)
    assert step.status is StepStatus.dispatched
    assert later.snapshot.version == state.snapshot.version + 1


def test_a_dispatch_of_a_finished_step_with_another_command_is_superseded() -> None:
    state = fold([requested(), dispatch("enrich", "cmd-1"), result("enrich", "cmd-1")])
    later = fold([dispatch("enrich", "cmd-2")], state)
    assert later.snapshot.superseded_decisions == 1
    assert later.snapshot.step("enrich").status is StepStatus.succeeded
    assert later.snapshot.step("enrich").command_id == "cmd-1"


@pytest.mark.parametrize("action", list(DecisionAction))
def test_any_decision_on_a_terminal_run_is_superseded(action: DecisionAction) -> None:
    ended = fold([requested(), decision(DecisionAction.fail, "email")])
    assert ended.snapshot.status is RunStatus.failed
    later = fold([decision(action, "slack", command_id="cmd-slack")], ended)
    assert later.snapshot.superseded_decisions == 1
    assert later.snapshot.status is RunStatus.failed
    assert later.snapshot.reason == ended.snapshot.reason
    assert later.snapshot.steps == ended.snapshot.steps


def test_a_compensate_decision_for_a_step_that_did_not_succeed_moves_nothing() -> None:
    state = started()
    later = fold([decision(DecisionAction.compensate, "jira")], state)
    assert later.snapshot.steps == state.snapshot.steps
    assert later.snapshot.status is RunStatus.running
    assert later.snapshot.superseded_decisions == 1


# -- results -----------------------------------------------------------------------------------------
def test_a_succeeded_result_stores_the_output() -> None:
    output = {"name": "Acme Robotics", "industry": "Software", "employees": 60}
    snap = fold([requested(), dispatch("enrich"), result("enrich", output=output)]).snapshot
    step = snap.step("enrich")
    assert step.status is StepStatus.succeeded
    assert step.output == output
    assert step.error is None
    assert snap.results() == {"enrich": output}
    assert snap.status is RunStatus.running


@pytest.mark.parametrize(("kind", "expected"), [("permanent", "permanent: 400 bad"), (None, "error: 400 bad")])
def test_a_failed_result_stores_the_error_with_its_kind(kind: str | None, expected: str) -> None:
    events = [requested(), dispatch("email"), result("email", ok=False, error="400 bad", error_kind=kind, output={})]
    snap = fold(events).snapshot
    step = snap.step("email")
    assert step.status is StepStatus.failed
    assert step.error == expected
    assert snap.results() == {}
    assert snap.status is RunStatus.running  # the decider ends the run, not the fold


def test_a_result_before_its_decision_is_accepted_and_the_late_decision_is_not_superseded() -> None:
    early = fold([requested(), result("enrich", CMD_E, output={"industry": "Retail"})])
    step = early.snapshot.step("enrich")
    assert step.status is StepStatus.succeeded
    assert step.command_id == CMD_E
    assert step.decision_id is None
    assert step.output == {"industry": "Retail"}

    late = fold([dispatch("enrich", CMD_E, "dec-e")], early)
    step = late.snapshot.step("enrich")
    assert late.snapshot.superseded_decisions == 0
    assert step.status is StepStatus.succeeded
    assert step.decision_id == "dec-e"
    assert step.output == {"industry": "Retail"}
    assert late.snapshot.version == early.snapshot.version + 1


def test_a_late_decision_with_another_command_than_the_early_result_is_superseded() -> None:
    early = fold([requested(), result("enrich", CMD_E)])
    late = fold([dispatch("enrich", "cmd-stale", "dec-stale")], early)
    assert late.snapshot.superseded_decisions == 1
    assert late.snapshot.step("enrich").decision_id is None
    assert late.snapshot.step("enrich").command_id == CMD_E


def test_a_compensation_result_marks_the_step_compensated() -> None:
    state = fold([requested(), dispatch("jira"), result("jira", output={"key": "ACME"})])
    undo_id = events.command_id(RUN, "jira", "compensate")  # read before the undo's decision (two topics)
    undone = fold([result("jira", undo_id, output={"closed": "ACME"}, operation="compensate")], state)
    assert undone.snapshot.step("jira").status is StepStatus.compensated
    failed_undo = fold([result("jira", undo_id, ok=False, operation="compensate")], state)
    assert failed_undo.snapshot.step("jira").status is StepStatus.succeeded


# -- endings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("action", "status"),
    [
        (DecisionAction.complete, RunStatus.completed),
        (DecisionAction.fail, RunStatus.failed),
        (DecisionAction.escalate, RunStatus.escalated),
    ],
)
def test_an_ending_decision_ends_the_run_and_later_announcements_do_not_change_it(
    action: DecisionAction, status: RunStatus
) -> None:
    ended = fold([requested(), decision(action, "slack")])
    assert ended.snapshot.status is status
    assert ended.snapshot.reason == f"{action.value} slack"
    for announcement in (
        RunCompleted(run_id=RUN, decision_id="d", reason="announced completion"),
        RunFailed(run_id=RUN, decision_id="d", status=FailureStatus.failed, reason="announced failure"),
        RunFailed(run_id=RUN, decision_id="d", status=FailureStatus.escalated, reason="announced escalation"),
    ):
        after = fold([announcement], ended)
        assert after.snapshot.status is status
        assert after.snapshot.reason == f"{action.value} slack"
        assert after.snapshot.version == ended.snapshot.version + 1


@pytest.mark.parametrize(
    ("event", "status"),
    [
        (RunCompleted(run_id=RUN, decision_id="d", reason="done"), RunStatus.completed),
        (RunFailed(run_id=RUN, decision_id="d", status=FailureStatus.failed, reason="done"), RunStatus.failed),
        (
            RunFailed(run_id=RUN, decision_id="d", status=FailureStatus.escalated, reason="done"),
            RunStatus.escalated,
        ),
    ],
)
def test_an_announcement_ends_a_run_that_is_still_running(event: Event, status: RunStatus) -> None:
    snap = fold([requested(), event]).snapshot
    assert snap.status is status
    assert snap.reason == "done"


def test_deadline_exceeded_flags_a_running_run() -> None:
    snap = fold([requested(), RunDeadlineExceeded(run_id=RUN, deadline_at=T0)]).snapshot
    assert snap.deadline_exceeded is True
    assert snap.status is RunStatus.running


def test_deadline_exceeded_after_the_end_does_not_flag_the_run() -> None:
    ended = fold([requested(), decision(DecisionAction.complete)])
    snap = fold([RunDeadlineExceeded(run_id=RUN, deadline_at=T0)], ended).snapshot
    assert snap.deadline_exceeded is False
    assert snap.status is RunStatus.completed


# -- unprocessable -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "event",
    [
        dispatch("enrich"),
        result("enrich"),
        RunCompleted(run_id=RUN, decision_id="d", reason="r"),
        RunFailed(run_id=RUN, decision_id="d", status=FailureStatus.failed, reason="r"),
        RunDeadlineExceeded(run_id=RUN, deadline_at=T0),
    ],
    ids=lambda e: e.type,
)
def test_an_event_of_a_run_never_requested_is_unprocessable(event: Event) -> None:
    with pytest.raises(Unprocessable) as info:
        apply(None, event, DEFAULT_DEADLINE_S)
    assert info.value.reason == "unknown-run"
    assert RUN in info.value.detail


def test_a_second_run_requested_is_a_duplicate_run() -> None:
    state = started()
    with pytest.raises(Unprocessable) as info:
        apply(state, requested(event_id="req-2"), DEFAULT_DEADLINE_S)
    assert info.value.reason == "duplicate-run"


def test_a_result_for_an_unknown_step_is_unprocessable() -> None:
    with pytest.raises(Unprocessable) as info:
        apply(started(), result("fax"), DEFAULT_DEADLINE_S)
    assert info.value.reason == "unknown-step"
    assert "fax" in info.value.detail


def test_a_result_for_another_command_of_the_step_is_unprocessable() -> None:
    state = fold([requested(), dispatch("enrich", "cmd-1")])
    with pytest.raises(Unprocessable) as info:
        apply(state, result("enrich", "cmd-2"), DEFAULT_DEADLINE_S)
    assert info.value.reason == "unknown-command"


def test_a_dispatch_for_an_unknown_step_is_unprocessable() -> None:
    with pytest.raises(Unprocessable) as info:
        apply(started(), dispatch("fax"), DEFAULT_DEADLINE_S)
    assert info.value.reason == "unknown-step"


# -- replay ------------------------------------------------------------------------------------------
def _snapshots(events: list[Event]) -> list[Any]:
    state: RunState | None = None
    out = []
    for event in events:
        applied = apply(state, event, DEFAULT_DEADLINE_S)
        state = applied.state
        out.append(state.snapshot.model_dump())
    return out


def test_replaying_the_same_log_gives_identical_snapshots() -> None:
    events = full_run()
    first, second = _snapshots(events), _snapshots(events)
    assert first == second
    assert first[-1]["status"] == RunStatus.completed
    assert [s["version"] for s in first] == list(range(1, len(events) + 1))


def test_duplicates_interleaved_give_the_same_final_snapshot() -> None:
    events = full_run()
    with_duplicates = [*events[:3], events[0], events[2], events[1], *events[3:6], events[4], *events[6:], *events]
    assert len(with_duplicates) > len(events)
    clean = fold(events)
    noisy = fold(with_duplicates)
    assert noisy.snapshot == clean.snapshot
    assert noisy.applied == clean.applied


def test_results_before_decisions_reach_the_same_step_states() -> None:
    """Two topics, no cross-topic order: every result overtaking its decision ends the same way."""
    in_order = full_run()
    overtaken: list[Event] = [in_order[0]]
    for i in range(1, 1 + 2 * len(STEPS), 2):
        overtaken += [in_order[i + 1], in_order[i]]
    overtaken += in_order[1 + 2 * len(STEPS) :]
    a, b = fold(in_order).snapshot, fold(overtaken).snapshot
    assert a.status is b.status is RunStatus.completed
    assert b.superseded_decisions == 0
    for step in STEPS:
        sa, sb = a.step(step), b.step(step)
        assert (sa.status, sa.command_id, sa.decision_id, sa.output) == (
            sb.status,
            sb.command_id,
            sb.decision_id,
            sb.output,
        )


# -- compensation ------------------------------------------------------------------------------------
def _abandoned_after_jira() -> RunState:
    return fold(
        [
            requested(),
            dispatch("enrich"),
            result("enrich"),
            dispatch("jira"),
            result("jira", output={"key": "ACMEX1"}),
            RunDeadlineExceeded(run_id=RUN, occurred_at=_at(), deadline_at=_at()),
            decision(DecisionAction.escalate),
        ]
    )


def test_an_undo_of_a_succeeded_step_runs_even_on_an_ended_run() -> None:
    state = _abandoned_after_jira()
    assert state.snapshot.status is RunStatus.escalated
    undo = decision(DecisionAction.compensate, "jira", command_id="cmd-jira-undo")
    undoing = fold([undo], state)
    jira = undoing.snapshot.step("jira")
    assert jira.status is StepStatus.compensating and jira.decision_id == undo.decision_id
    assert jira.output == {"key": "ACMEX1"}  # what was created stays reported
    done = fold([result("jira", command_id="cmd-jira-undo", operation="compensate")], undoing)
    assert done.snapshot.step("jira").status is StepStatus.compensated
    # A late repeat of the original create result does not resurrect the step.
    again = fold([result("jira", output={"key": "ACMEX1"})], done)
    assert again.snapshot.step("jira").status is StepStatus.compensated


def test_a_failed_undo_stays_visible_and_is_not_marked_done() -> None:
    undoing = fold([decision(DecisionAction.compensate, "jira")], _abandoned_after_jira())
    failed = fold([result("jira", ok=False, error="boom", operation="compensate")], undoing)
    jira = failed.snapshot.step("jira")
    assert jira.status is StepStatus.compensating and "compensation failed: boom" in (jira.error or "")


@pytest.mark.parametrize(("kind", "abandoned"), [("deadline", True), ("permanent", False), ("tool-error", False)])
def test_a_step_that_ran_out_of_time_abandons_the_run(kind: str, abandoned: bool) -> None:
    failed = result("email", ok=False, error="gave up", error_kind=kind)
    snap = fold([requested(), dispatch("email"), failed]).snapshot
    assert snap.step("email").status is StepStatus.failed
    assert snap.deadline_exceeded is abandoned
