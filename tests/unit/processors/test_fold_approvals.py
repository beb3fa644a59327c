"""The fold takes in approval requests and answers, and counts what a run spends (pure)."""

from __future__ import annotations

from datetime import timedelta

from streamagent.processors.state.fold import apply
from streamagent.processors.workflow import ONBOARDING
from test_fold import DEFAULT_DEADLINE_S, RUN, T0, decision, dispatch, fold, requested, result

from streamagent.events import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalStatus,
    DecisionAction,
    RunStatus,
    StepStatus,
)


def asked(request_id: str = "req-mail") -> ApprovalRequested:
    return ApprovalRequested(
        event_id=f"ask-{request_id}",
        run_id=RUN,
        occurred_at=T0 + timedelta(seconds=30),
        request_id=request_id,
        decision_id="dec-wait",
        step="email",
        tool="email",
        arguments={"to": "ada@elsewhere.net"},
        arguments_digest="d" * 64,
        reason="email outside the allow-list",
        policy_version="v1",
        expires_at=T0 + timedelta(hours=1),
    )


def held_run():  # type: ignore[no-untyped-def]
    events = [
        requested(),
        dispatch("enrich"),
        result("enrich"),
        dispatch("jira"),
        result("jira"),
        decision(DecisionAction.wait, "email"),
    ]
    return fold(events)


def test_a_request_is_recorded_and_asks_for_no_decision_while_it_waits() -> None:
    before = held_run()
    outcome = apply(before, asked(), DEFAULT_DEADLINE_S)
    assert outcome.changed and not outcome.publish
    (held,) = outcome.state.snapshot.approvals
    assert (held.step, held.status, held.reason) == ("email", ApprovalStatus.requested, "email outside the allow-list")
    assert not apply(outcome.state, asked(), DEFAULT_DEADLINE_S).changed  # the same event again


def test_a_grant_asks_for_the_next_decision_and_a_second_answer_changes_nothing() -> None:
    state = apply(held_run(), asked(), DEFAULT_DEADLINE_S).state
    grant = ApprovalGranted(event_id="g", run_id=RUN, request_id="req-mail", step="email", by="grace", note="ok")
    outcome = apply(state, grant, DEFAULT_DEADLINE_S)
    assert outcome.publish
    (held,) = outcome.state.snapshot.approvals
    assert (held.status, held.by, held.note) == (ApprovalStatus.granted, "grace", "ok")
    late = ApprovalDenied(event_id="d", run_id=RUN, request_id="req-mail", step="email", by="mallory")
    after = apply(outcome.state, late, DEFAULT_DEADLINE_S)
    assert not after.publish and after.state.snapshot.approvals[0].status is ApprovalStatus.granted


def test_a_denial_fails_the_held_step_and_the_failed_run_has_its_work_to_undo() -> None:
    state = apply(held_run(), asked(), DEFAULT_DEADLINE_S).state
    denied = ApprovalDenied(event_id="d", run_id=RUN, request_id="req-mail", step="email", by="grace", note="no")
    outcome = apply(state, denied, DEFAULT_DEADLINE_S)
    assert outcome.publish
    snap = outcome.state.snapshot
    assert snap.step("email").status is StepStatus.failed and snap.step("email").error == (
        "denied: approval refused by grace: no"
    )
    failed = apply(outcome.state, decision(DecisionAction.fail, "email"), DEFAULT_DEADLINE_S).state.snapshot
    assert failed.status is RunStatus.failed and ONBOARDING.undo_pending(failed)  # jira is undone


def test_an_expiry_is_an_answer_too() -> None:
    state = apply(held_run(), asked(), DEFAULT_DEADLINE_S).state
    outcome = apply(state, ApprovalExpired(event_id="x", run_id=RUN, request_id="req-mail", step="email"), 600.0)
    assert outcome.publish and outcome.state.snapshot.approvals[0].status is ApprovalStatus.expired


def test_the_run_counts_its_decisions_tool_calls_tokens_and_cost() -> None:
    paid = decision(DecisionAction.dispatch, "jira", command_id="cmd-jira").model_copy(
        update={"prompt_tokens": 100, "completion_tokens": 20, "cost_usd": 0.01}
    )
    snap = fold([requested(), dispatch("enrich"), result("enrich"), paid, result("jira", "cmd-jira")]).snapshot
    assert (snap.decisions, snap.tool_calls, snap.tokens, snap.cost_usd) == (2, 2, 120, 0.01)
    waited = fold([requested(), decision(DecisionAction.wait, "enrich")]).snapshot
    assert (waited.decisions, waited.tool_calls) == (1, 0)  # a wait is a decision, not a call
