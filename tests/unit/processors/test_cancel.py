"""An operator's cancel (``streamagent cancel``): the fold marks the run, the decision processor ends it and
its live children, what is in flight only lands, and the workflow's undo rule for a stopped run applies."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamagent.processors.decision.decider import Decision
from streamagent.processors.decision.gating import cancelled
from streamagent.processors.decision.processor import DecisionHandler
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.state.fold import apply, needs_decision
from streamagent.processors.workflow import Workflow, load_workflows
from test_child_runs import FAN, KID, PIPELINE, Producer, _first, _folder, _to_children
from test_decision_handler import _batch
from test_fan_out_fold import RUN, Run

from streamagent import codec, db
from streamagent.authn import Authenticator, Unauthenticated, issue
from streamagent.config import Settings
from streamagent.events import (
    DecisionAction,
    RunCancelRequested,
    RunFailed,
    RunStatus,
    StepStatus,
    cancel_event_id,
    child_run_id,
    command_id,
)

UNDONE = FAN.replace('tools = ["enrich", "jira"]', 'tools = ["enrich", "jira"]\ncompensate_abandoned = true') + (
    'compensate.tool = "jira"\n'
)


@pytest.fixture
def fan(tmp_path: Path) -> dict[str, Workflow]:
    return load_workflows(_folder(tmp_path, fan=UNDONE, kid=KID))


def cancel(by: str = "grace", reason: str = "the client withdrew") -> RunCancelRequested:
    return RunCancelRequested(event_id=cancel_event_id(RUN), run_id=RUN, by=by, reason=reason)


def test_a_cancel_marks_the_run_which_asks_for_its_end_whatever_is_in_flight(fan: dict[str, Workflow]) -> None:
    run = Run(fan["fan"])
    _to_children(run)  # the child run and the jira command are in flight
    assert not needs_decision(run.snap, run.wf)
    run._apply(cancel())
    assert run.snap.cancelled == "cancelled by grace: the client withdrew"
    assert run.snap.status is RunStatus.running and needs_decision(run.snap, run.wf)
    decision = cancelled(run.snap)  # whatever the decider would do: the model is not asked
    assert decision is not None and decision.action is DecisionAction.fail
    assert decision.reason == "cancelled by grace: the client withdrew"
    # Asked again (the same event, or by another operator meanwhile): the first cancel stands.
    assert not apply(run.state, cancel(), 600.0, run.wf).changed
    again = cancel(by="alan").model_copy(update={"event_id": "other"})
    assert apply(run.state, again, 600.0, run.wf).state.snapshot.cancelled == run.snap.cancelled


def test_the_decision_processor_ends_the_cancelled_run_and_its_live_child(
    settings: Settings, fan: dict[str, Workflow]
) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    run = Run(fan["fan"])
    _to_children(run)
    run._apply(cancel())
    producer = Producer()
    handler = DecisionHandler(settings, RulesDecider(fan), producer, keys=PIPELINE)  # type: ignore[arg-type]
    handler(_batch([_first(run.snap)]))
    ends = [codec.decode(v) for _, _, v, _ in producer.records if isinstance(codec.decode(v), RunFailed)]
    child = child_run_id(RUN, "check", command_id(RUN, "check"))
    # A status of its own, for the run and the child it takes with it.
    assert [(e.run_id, e.status.value) for e in ends] == [(RUN, "cancelled"), (child, "cancelled")]
    assert ends[0].reason == "cancelled by grace: the client withdrew"
    assert ends[1].reason == f"parent run {RUN} ended (cancelled): cancelled by grace: the client withdrew"


def test_results_in_flight_only_land_and_the_stopped_run_is_undone(fan: dict[str, Workflow]) -> None:
    run = Run(fan["fan"])
    _to_children(run)
    run._apply(cancel())
    decision = cancelled(run.snap)
    assert decision is not None
    run.record(decision)
    assert run.snap.status is RunStatus.cancelled
    run.result("project")  # the jira command sent before the cancel finishes
    assert run.status("project") is StepStatus.succeeded and run.snap.status is RunStatus.cancelled
    assert cancelled(run.snap) is None  # ended: no second ending
    late = cancel(by="alan").model_copy(update={"event_id": "late"})
    assert apply(run.state, late, 600.0, run.wf).state.snapshot.cancelled == run.snap.cancelled  # kept as it is
    # compensate_abandoned: a cancelled run is undone as one a person stopped (its jira project here).
    assert run.wf.undo_pending(run.snap)
    undo = run.decide()
    assert undo is not None and undo.action is DecisionAction.compensate and undo.step == "project"
    assert "cancelled by grace" in undo.reason


def test_only_an_operator_s_key_cancels_a_run_under_its_own_name() -> None:
    event = cancel()
    value = codec.encode(event)
    core = Authenticator(PIPELINE)
    assert core.verify(event, value, issue(PIPELINE, "operator:grace").headers(value)) == "operator:grace"
    with pytest.raises(Unauthenticated, match="only an operator's key cancels a run"):
        core.verify(event, value, issue(PIPELINE, "intake").headers(value))
    with pytest.raises(Unauthenticated, match="says by 'grace' but is signed by operator 'mallory'"):
        core.verify(event, value, issue(PIPELINE, "operator:mallory").headers(value))


def test_a_failure_decided_before_the_cancel_was_folded_stays_a_failure(fan: dict[str, Workflow]) -> None:
    run = Run(fan["fan"])
    _to_children(run)
    run._apply(cancel())
    # Decided on a snapshot from before the cancel: its reason is the failure's, not the cancel's.
    run.record(Decision(DecisionAction.fail, "step project failed: jira refused the key"))
    assert run.snap.status is RunStatus.failed and run.snap.reason.startswith("step project failed")
