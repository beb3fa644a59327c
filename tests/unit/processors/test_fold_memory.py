"""The fold and shared memory: a command not executed because memory changed sends its step back to be
decided again (once, for that decision); a change under a step held for approval asks for a decision; a
change after the effect is a record only."""

from __future__ import annotations

from datetime import timedelta

from streamagent.processors.state.fold import apply
from test_fold import DEFAULT_DEADLINE_S, RUN, T0, _at, dispatch, fold, requested, result

from streamagent import events
from streamagent.events import (
    STALE_MEMORY,
    ApprovalRequested,
    DecisionAction,
    DecisionRecorded,
    MemoryChanged,
    StepStatus,
    ToolResult,
    ToolStatus,
)


def _stale(decision_id: str) -> ToolResult:
    return ToolResult(
        event_id=f"stale-{decision_id}",
        run_id=RUN,
        occurred_at=_at(),
        command_id=events.command_id(RUN, "enrich"),
        tool="enrich",
        step="enrich",
        status=ToolStatus.failed,
        output={"decision_id": decision_id, "changed": ["company/acme.io v1 → v2"]},
        error="decided on memory that changed before the call: company/acme.io v1 → v2",
        error_kind=STALE_MEMORY,
        attempts=0,
    )


def test_a_stale_memory_result_sends_the_step_back_to_be_decided_again_once() -> None:
    state = fold([requested(), dispatch("enrich", decision_id="d-1")])
    applied = apply(state, _stale("d-1"), DEFAULT_DEADLINE_S)
    step = applied.state.snapshot.step("enrich")
    assert step.status is StepStatus.pending and step.error is not None and "stale-memory" in step.error
    assert applied.publish  # a decision is asked for
    # Dispatched again by a new decision: a late copy about the old decision changes nothing.
    again = fold([dispatch("enrich", decision_id="d-2")], applied.state)
    late = apply(again, _stale("d-1").model_copy(update={"event_id": "stale-copy"}), DEFAULT_DEADLINE_S)
    assert late.state.snapshot.step("enrich").status is StepStatus.dispatched
    done = fold([result("enrich")], late.state)
    assert done.snapshot.step("enrich").status is StepStatus.succeeded


def _held() -> tuple[object, str]:
    state = fold([requested(), dispatch("enrich"), result("enrich"), dispatch("jira"), result("jira")])
    wait = DecisionRecorded(
        event_id="d-wait",
        run_id=RUN,
        occurred_at=_at(),
        decision_id="d-wait",
        based_on_version=state.snapshot.version,
        action=DecisionAction.wait,
        step="email",
        reason="waiting for approval of step email: mail outside the allow-list",
        decider="rules",
        memory={"contact/acme-robotics.io": 1},
    )
    asked = ApprovalRequested(
        run_id=RUN,
        occurred_at=_at(),
        request_id="req-email",
        decision_id="d-wait",
        step="email",
        tool="email",
        arguments={"to": "old@acme-robotics.io"},
        arguments_digest="ab" * 32,
        reason="mail outside the allow-list",
        policy_version="p1",
        expires_at=T0 + timedelta(hours=1),
    )
    return fold([wait, asked], state), "d-wait"


def _changed(decision_id: str, step: str = "email") -> MemoryChanged:
    return MemoryChanged(
        run_id=RUN,
        occurred_at=_at(),
        decision_id=decision_id,
        step=step,
        ref="contact/acme-robotics.io",
        read_version=1,
        version=2,
        as_of=_at(),
    )


def test_a_change_under_a_step_held_for_approval_asks_for_a_decision() -> None:
    state, decision_id = _held()
    applied = apply(state, _changed(decision_id), DEFAULT_DEADLINE_S)  # type: ignore[arg-type]
    assert applied.publish
    assert applied.state.snapshot.reason == (
        "contact/acme-robotics.io changed v1 → v2 while step email waited for approval: decided again"
    )
    # About an older decision: a record only.
    older = apply(state, _changed("d-older"), DEFAULT_DEADLINE_S)  # type: ignore[arg-type]
    assert not older.publish and older.state.snapshot.reason == state.snapshot.reason  # type: ignore[attr-defined]


def test_a_change_after_the_effect_is_a_record_only() -> None:
    state = fold([requested(), dispatch("enrich", decision_id="d-e"), result("enrich")])
    applied = apply(state, _changed("d-e", step="enrich"), DEFAULT_DEADLINE_S)
    assert applied.changed and not applied.publish
    assert applied.state.snapshot.step("enrich").status is StepStatus.succeeded
