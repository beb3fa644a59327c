"""One snapshot and one decision per step: which folded events ask the decision layer for a decision,
and how lost commands are re-driven or given up on (pure, no I/O)."""

from __future__ import annotations

from datetime import timedelta

from streamagent.processors.state.fold import RunState, apply, in_flight, needs_decision
from test_fold import DEFAULT_DEADLINE_S, RUN, STEPS, T0, decision, dispatch, full_run, requested, result

from streamagent.events import (
    CommandLost,
    CommandResent,
    DecisionAction,
    Event,
    RunCompleted,
    RunDeadlineExceeded,
    RunStatus,
    StepStatus,
    command_id,
)

CMD_ENRICH = command_id(RUN, "enrich")


def publishes(events: list[Event]) -> list[tuple[str, bool]]:
    state: RunState | None = None
    out = []
    for event in events:
        applied = apply(state, event, DEFAULT_DEADLINE_S)
        state = applied.state
        out.append((event.type, applied.publish))
    return out


def test_a_whole_run_publishes_one_snapshot_per_step_plus_the_request() -> None:
    flags = publishes(full_run())
    # request, then each step's result, asks for a decision; a recorded decision never does, nor the end.
    assert [t for t, p in flags if p] == ["RunRequested"] + ["ToolResult"] * len(STEPS)
    assert not any(p for t, p in flags if t in ("DecisionRecorded", "RunCompleted"))


def test_a_result_folded_before_its_decision_waits_for_the_decision() -> None:
    cmd = CMD_ENRICH  # read before its decision: the id the decision processor gives it
    flags = publishes([requested(), result("enrich", cmd), dispatch("enrich", cmd)])
    # The result alone would show a step whose decision the state has not taken in: no snapshot yet.
    assert flags == [("RunRequested", True), ("ToolResult", False), ("DecisionRecorded", True)]


def test_a_deadline_while_a_command_is_in_flight_waits_for_its_result() -> None:
    events: list[Event] = [requested(), dispatch("enrich")]
    events.append(RunDeadlineExceeded(run_id=RUN, occurred_at=T0 + timedelta(seconds=50), deadline_at=T0))
    events.append(result("enrich"))
    assert publishes(events) == [
        ("RunRequested", True),
        ("DecisionRecorded", False),
        ("RunDeadlineExceeded", False),
        ("ToolResult", True),
    ]


def test_an_abandoned_run_with_something_to_undo_asks_for_the_undo() -> None:
    events: list[Event] = [requested()]
    for step in ("enrich", "jira"):
        events += [dispatch(step), result(step, output={"key": "ACME1"})]
    events.append(RunDeadlineExceeded(run_id=RUN, occurred_at=T0 + timedelta(seconds=50), deadline_at=T0))
    events.append(decision(DecisionAction.escalate))
    state: RunState | None = None
    for event in events:
        applied = apply(state, event, DEFAULT_DEADLINE_S)
        state = applied.state
    assert state is not None and state.snapshot.status is RunStatus.escalated
    assert applied.publish  # the escalation leaves the Jira project to close


def test_a_completed_run_asks_for_nothing() -> None:
    state = None
    for event in full_run():
        state = apply(state, event, DEFAULT_DEADLINE_S).state
    assert state is not None and not needs_decision(state.snapshot)
    again = apply(state, RunCompleted(run_id=RUN, decision_id="d", reason="again"), DEFAULT_DEADLINE_S)
    assert not again.publish


def test_a_dispatch_records_where_its_command_landed() -> None:
    record = dispatch("enrich").model_copy(update={"command_partition": 3, "command_offset": 41})
    state = apply(apply(None, requested(), DEFAULT_DEADLINE_S).state, record, DEFAULT_DEADLINE_S).state
    step = state.snapshot.step("enrich")
    assert (step.command_partition, step.command_offset, step.dispatched_at) == (3, 41, record.occurred_at)
    assert in_flight(state.snapshot) == [step]


def _lost(redrive: int, give_up: bool = False, command_id: str = CMD_ENRICH) -> CommandLost:
    return CommandLost(
        run_id=RUN, command_id=command_id, step="enrich", tool="enrich", redrive=redrive, give_up=give_up, evidence="x"
    )


def _in_flight_enrich() -> RunState:
    state = apply(None, requested(), DEFAULT_DEADLINE_S).state
    return apply(state, dispatch("enrich"), DEFAULT_DEADLINE_S).state


def test_a_lost_command_asks_for_a_resend_and_the_copy_is_judged_next() -> None:
    applied = apply(_in_flight_enrich(), _lost(1), DEFAULT_DEADLINE_S)
    assert applied.publish and applied.state.snapshot.redrive_command_id == CMD_ENRICH
    assert applied.state.snapshot.step("enrich").redrives == 1
    resent = CommandResent(
        run_id=RUN,
        command_id=CMD_ENRICH,
        step="enrich",
        tool="enrich",
        redrive=1,
        command_partition=2,
        command_offset=99,
    )
    after = apply(applied.state, resent, DEFAULT_DEADLINE_S)
    step = after.state.snapshot.step("enrich")
    assert not after.publish and after.state.snapshot.redrive_command_id is None
    assert (step.status, step.command_partition, step.command_offset) == (StepStatus.dispatched, 2, 99)


def test_giving_up_on_a_lost_command_fails_its_step_with_the_evidence() -> None:
    state = apply(_in_flight_enrich(), _lost(1), DEFAULT_DEADLINE_S).state
    applied = apply(state, _lost(2, give_up=True), DEFAULT_DEADLINE_S)
    step = applied.state.snapshot.step("enrich")
    assert step.status is StepStatus.failed and step.error is not None and step.error.startswith("lost:")
    assert applied.publish  # the decider now fails (or escalates) the run


def test_stale_loss_evidence_changes_nothing_but_the_version() -> None:
    state = apply(_in_flight_enrich(), result("enrich"), DEFAULT_DEADLINE_S).state
    applied = apply(state, _lost(1), DEFAULT_DEADLINE_S)
    assert applied.state.snapshot.step("enrich").status is StepStatus.succeeded
    assert applied.state.snapshot.redrive_command_id is None and not applied.publish


def test_a_step_ends_the_same_whichever_of_its_decision_and_result_is_folded_first() -> None:
    cmd = CMD_ENRICH  # read before its decision: the id the decision processor gives it
    start, decided, done = requested(), dispatch("enrich", cmd), result("enrich", cmd)
    decided_first = publishes_state([start, decided, done])
    result_first = publishes_state([start, done, decided])
    assert decided_first.snapshot.step("enrich") == result_first.snapshot.step("enrich")
    assert result_first.snapshot.step("enrich").attempts == 1


def publishes_state(events: list[Event]) -> RunState:
    state: RunState | None = None
    for event in events:
        state = apply(state, event, DEFAULT_DEADLINE_S).state
    assert state is not None
    return state
