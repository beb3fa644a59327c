"""Child workflows: a step that names a workflow starts a child run, and the child's end answers the step."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import TEST_COMMAND_KEYS
from streamagent.processors.decision.choice import ChosenDecider
from streamagent.processors.decision.processor import DecisionHandler
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.state.app import StateWorker
from streamagent.processors.state.children import parent_result, refusal_result
from streamagent.processors.state.fold import RunState, apply, loss_checked, needs_decision
from streamagent.processors.state.store import MemoryStore
from streamagent.processors.workflow import Workflow, WorkflowError, default_workflows, load_workflows
from test_decision_handler import LandingProducer, _batch
from test_fan_out_fold import RUN, Run, steps_of
from test_state_timer import RecordingProducer, child_request, fold, parent_request

from streamagent import codec, db
from streamagent.authn import Authenticator
from streamagent.config import Settings
from streamagent.errors import Unprocessable
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    FailureStatus,
    RunCompleted,
    RunDeadlineExceeded,
    RunFailed,
    RunRequested,
    StateSnapshot,
    StepStatus,
    ToolResult,
    ToolStatus,
    child_run_id,
    command_id,
    ended_by_parent_id,
    now,
    requested_event_id,
    stable_id,
)
from streamagent.signing import parse_keys
from streamagent.topics import RUN_EVENTS

PIPELINE = parse_keys(TEST_COMMAND_KEYS, "test keys")

PARENT = """name = "parent"
goal = "hand a check to a child"
tools = ["lookup"]

[[steps]]
name = "look"
tool = "lookup"

[[steps]]
name = "check"
workflow = "child"
needs = ["look"]
args.size = "{steps.look.output.size | default: 0}"
"""

CHILD = """name = "child"
goal = "check"
tools = ["lookup"]

[[steps]]
name = "look"
tool = "lookup"
"""


def _folder(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


def test_a_step_may_name_a_workflow_instead_of_a_tool(tmp_path: Path) -> None:
    workflows = load_workflows(_folder(tmp_path, parent=PARENT, child=CHILD))
    step = workflows["parent"].step("check")
    assert step.workflow == "child" and step.tool == "workflow:child" and step.needs == ("look",)


@pytest.mark.parametrize(
    ("parent", "child", "where", "reason"),
    [
        (
            PARENT.replace('workflow = "child"', 'workflow = "child"\ntool = "lookup"'),
            CHILD,
            "steps.check.tool",
            "exactly one",
        ),
        (PARENT.replace('workflow = "child"\n', ""), CHILD, "steps.check.tool", "exactly one"),
        (
            PARENT.replace('workflow = "child"', 'workflow = "ghost"'),
            CHILD,
            "steps.check.workflow",
            "unknown workflow 'ghost'",
        ),
        (PARENT.replace('workflow = "child"', 'workflow = "Child Flow"'), CHILD, "steps.check.workflow", "lowercase"),
        (PARENT.replace('workflow = "child"', 'workflow = "parent"'), CHILD, "steps.check.workflow", "cycle"),
        (PARENT.replace('tools = ["lookup"]', 'tools = ["lookup"]\ndecider = "llm"'), CHILD, "decider", "by the rules"),
        (
            PARENT,
            CHILD + '\n[[steps]]\nname = "back"\nworkflow = "parent"\n',
            "steps.",
            "a cycle of child workflows",
        ),
    ],
    ids=["both", "neither", "unknown", "bad-name", "self", "llm", "cycle"],
)
def test_a_bad_child_step_is_refused_naming_file_and_step(
    tmp_path: Path, parent: str, child: str, where: str, reason: str
) -> None:
    _folder(tmp_path, parent=parent, child=child)
    with pytest.raises(WorkflowError) as info:
        load_workflows(tmp_path)
    assert where in info.value.where and reason in info.value.reason
    assert info.value.file.endswith((".toml",))


def test_the_reference_workflows_load_with_their_child() -> None:
    from streamagent.processors.workflow import default_workflows

    workflows = default_workflows()
    kyc = workflows["onboarding-kyc"].step("kyc")
    assert kyc.workflow == "kyc-check" and "kyc-check" in workflows
    assert workflows["onboarding-kyc"].max_parallel == 3


# -- the fold and the decision processor: starting a child, its answer, the parent's budget -------------
FAN = """name = "fan"
goal = "a child beside a tool step"
tools = ["enrich", "jira"]
max_parallel = 2
on_branch_failure = "stop"

[[steps]]
name = "look"
tool = "enrich"
args.domain = "{request.company_domain}"

[[steps]]
name = "check"
workflow = "kid"
needs = ["look"]
args.industry = "{steps.look.output.industry | default: unknown}"

[[steps]]
name = "project"
tool = "jira"
needs = ["look"]
args.key = "{request.company_name | run_key}"
"""

KID = """name = "kid"
goal = "a check"
tools = ["enrich"]

[[steps]]
name = "lookup"
tool = "enrich"
args.domain = "{request.company_domain}"
"""


class Producer(LandingProducer):
    """Also keeps each record's key and headers."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, bytes, bytes, Any]] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any = None, **kw: Any) -> None:
        self.records.append((topic, key, value, kw.get("headers")))
        super().produce(topic, key, value, on_delivery)


@pytest.fixture
def fan(tmp_path: Path) -> dict[str, Workflow]:
    return load_workflows(_folder(tmp_path, fan=FAN, kid=KID))


def _to_children(run: Run) -> None:
    """The parent decided and folded up to its fan-out: ``look`` succeeded, ``check`` and ``project`` sent."""
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("look", output={"industry": "Software"})
    decision = run.decide()
    assert steps_of(decision) == ["check", "project"]
    run.record(decision)  # type: ignore[arg-type]


def test_a_child_step_is_dispatched_like_a_tool_step_and_never_checked_for_loss(fan: dict[str, Workflow]) -> None:
    run = Run(fan["fan"])
    _to_children(run)
    assert decide_tool(run, "check") == "workflow:kid"
    assert run.status("check") is StepStatus.dispatched and run.snap.tool_calls == 3
    assert [s.name for s in loss_checked(run.snap, run.wf)] == ["project"]  # the child run may take long
    assert not needs_decision(run.snap, run.wf)  # both on their way


def decide_tool(run: Run, step: str) -> str:
    return run.wf.step(step).tool


def test_the_child_s_answer_succeeds_the_step_and_its_spending_joins_the_parent_s(fan: dict[str, Workflow]) -> None:
    run = Run(fan["fan"])
    _to_children(run)
    before = run.snap
    run._apply(
        ToolResult(
            event_id="child-answer",
            run_id=RUN,
            command_id=command_id(RUN, "check"),
            tool="workflow:kid",
            step="check",
            status=ToolStatus.succeeded,
            output={"child_run_id": "kid-1", "lookup": {"industry": "Software"}},
            prompt_tokens=120,
            cost_usd=0.01,
            tool_calls=4,
        )
    )
    assert run.status("check") is StepStatus.succeeded
    assert run.snap.step("check").output["lookup"] == {"industry": "Software"}
    assert run.snap.tool_calls == before.tool_calls + 4  # the child's commands count against the parent
    assert (run.snap.tokens, run.snap.tool_tokens) == (before.tokens + 120, before.tool_tokens + 120)
    # A real tool's result for the child step is refused: only a ``workflow:kid`` result answers it.
    forged = ToolResult(
        run_id=RUN, command_id=command_id(RUN, "check"), tool="enrich", step="check", status=ToolStatus.succeeded
    )
    with pytest.raises(Unprocessable, match=r"the step's tool is 'workflow:kid'"):
        apply(run.state, forged, 600.0, run.wf)


def _child_state(wf: Workflow) -> RunState:
    parent_cid = command_id(RUN, "check")
    child = child_run_id(RUN, "check", parent_cid)
    request = RunRequested(
        event_id=requested_event_id(child),
        run_id=child,
        company_name="Northwind",
        company_domain="northwind.io",
        contact_name="Zed Zulu",
        contact_email="zed@northwind.io",
        requested_by="test",
        workflow="kid",
        parent_run_id=RUN,
        parent_step="check",
        parent_command_id=parent_cid,
    )
    state = apply(None, request, 600.0, wf).state
    again = apply(state, request, 600.0, wf)  # a re-dispatch or redelivery: the same run, folded once
    assert not again.changed
    return state


def test_a_child_s_first_ending_answers_its_parent_once(fan: dict[str, Workflow]) -> None:
    state = _child_state(fan["kid"])
    assert state.snapshot.request.parent_step == "check"
    done = RunCompleted(
        event_id=stable_id(state.snapshot.run_id, "completed"),
        run_id=state.snapshot.run_id,
        decision_id="d",
        results={"lookup": {"industry": "Software"}},
        reason="every step succeeded",
    )
    after = apply(state, done, 600.0, fan["kid"]).state
    answer = parent_result(after, done)
    assert answer is not None and answer.run_id == RUN and answer.command_id == command_id(RUN, "check")
    assert (answer.tool, answer.status, answer.output["lookup"]) == (
        "workflow:kid",
        ToolStatus.succeeded,
        {"industry": "Software"},
    )
    assert parent_result(after, done) == answer  # a redelivered ending: the same result (taken once by its id)
    # The parent ending the child afterwards does not turn the answer into a failure.
    late = RunFailed(
        event_id=ended_by_parent_id(state.snapshot.run_id),
        run_id=state.snapshot.run_id,
        decision_id="p",
        status=FailureStatus.failed,
        reason="parent run ended",
    )
    assert parent_result(apply(after, late, 600.0, fan["kid"]).state, late) is None
    # A child that fails answers with a permanent failure and its reason; a run that is no child answers nothing.
    failed = apply(state, late, 600.0, fan["kid"]).state
    answer = parent_result(failed, late)
    assert answer is not None and answer.status is ToolStatus.failed and "parent run ended" in (answer.error or "")
    plain = Run(fan["kid"])
    assert parent_result(plain.state, done.model_copy(update={"run_id": RUN})) is None  # type: ignore[arg-type]


def test_the_handler_starts_the_child_on_the_run_log_keyed_by_its_run_and_signed(
    settings: Settings, fan: dict[str, Workflow]
) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    run = Run(fan["fan"])
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("look", output={"industry": "Software"})
    producer = Producer()
    handler = DecisionHandler(settings, RulesDecider(fan), producer, keys=PIPELINE)  # type: ignore[arg-type]
    snap = _first(run.snap).model_copy(update={"deadline_at": now() + timedelta(seconds=300)})
    handler(_batch([snap]))
    events = settings.topic(RUN_EVENTS)
    requests = [
        (k, v, h) for t, k, v, h in producer.records if t == events and isinstance(codec.decode(v), RunRequested)
    ]
    ((key, value, headers),) = requests
    child = codec.decode(value)
    assert isinstance(child, RunRequested)
    assert key == child.run_id.encode() == child_run_id(RUN, "check", command_id(RUN, "check")).encode()
    assert (child.workflow, child.parent_run_id, child.parent_step) == ("kid", RUN, "check")
    assert child.labels["industry"] == "Software"
    assert child.occurred_at + timedelta(seconds=child.deadline_s or 0) <= snap.deadline_at  # never the later
    assert Authenticator(PIPELINE).verify(child, value, headers) == "decision"
    (record,) = [
        codec.decode(v)
        for t, _, v, _ in producer.records
        if t == events and isinstance(codec.decode(v), DecisionRecorded)
    ]
    assert {d.step: d.tool for d in record.dispatched()} == {"check": "workflow:kid", "project": "jira"}
    producer.records.clear()
    handler(_batch([snap]))  # redelivered: the same request bytes, so the same child run
    assert [v for t, _, v, _ in producer.records if t == events and isinstance(codec.decode(v), RunRequested)] == [
        value
    ]


def test_a_parent_that_stops_on_a_failed_branch_ends_without_waiting_and_ends_its_child(
    settings: Settings, fan: dict[str, Workflow]
) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    run = Run(fan["fan"])
    _to_children(run)
    run.result("project", ok=False)
    assert needs_decision(run.snap, run.wf)  # the child still runs, but the run must end
    decision = run.decide()
    assert decision is not None and decision.action is DecisionAction.fail
    producer = Producer()
    handler = DecisionHandler(settings, RulesDecider(fan), producer, keys=PIPELINE)  # type: ignore[arg-type]
    handler(_batch([_first(run.snap)]))
    ends = [codec.decode(v) for t, _, v, _ in producer.records if isinstance(codec.decode(v), RunFailed)]
    child = child_run_id(RUN, "check", command_id(RUN, "check"))
    assert [(e.run_id, e.event_id) for e in ends] == [
        (RUN, stable_id(RUN, "ended")),
        (child, ended_by_parent_id(child)),
    ]
    assert ends[1].reason.startswith(f"parent run {RUN} ended (failed)")


def _first(snap: StateSnapshot) -> StateSnapshot:
    """The snapshot as a fresh decision processor's first sight of the run (it has recorded nothing for it)."""
    return snap.model_copy(update={"version": 1, "last_decision_id": None})


def test_a_parent_past_its_deadline_does_not_wait_for_its_child(fan: dict[str, Workflow]) -> None:
    run = Run(fan["fan"])
    _to_children(run)
    run.result("project")
    assert not needs_decision(run.snap, run.wf)  # the child's answer is on its way
    run._apply(RunDeadlineExceeded(event_id="late", run_id=RUN, deadline_at=run.snap.deadline_at))
    assert needs_decision(run.snap, run.wf)
    decision = run.decide()
    assert decision is not None and decision.action is DecisionAction.escalate


def test_a_workflow_with_child_steps_is_decided_by_the_rules_whatever_the_default(fan: dict[str, Workflow]) -> None:
    rules = RulesDecider(fan)

    class Model:
        name = "llm"

        def decide(self, _snap: StateSnapshot) -> None:
            raise AssertionError("the model was asked about a workflow with child steps")

    chosen = ChosenDecider("llm", fan, rules, Model())  # type: ignore[arg-type]
    decision = chosen.decide(Run(fan["fan"]).snap)
    assert decision is not None and decision.decider == "rules" and decision.step == "look"


def test_a_refused_child_request_fails_its_parent_s_step_at_once() -> None:
    """A verified child request the fold refuses (here its workflow is unknown to this state processor) is
    dead-lettered and answers the parent's step with a permanent failure naming the reason: the parent
    decides on it now instead of waiting for its deadline. A redelivery answers with the same event."""
    workflows = {name: wf for name, wf in default_workflows().items() if name != "kyc-check"}
    producer = RecordingProducer()
    worker = StateWorker(Settings(partitions=1, max_running_runs=0), MemoryStore(), producer, workflows=workflows)  # type: ignore[arg-type]
    worker.sync_assignment(frozenset({0}))
    kid = child_request("p1")
    fold(worker, parent_request("p1"), kid)
    answers = [codec.decode(v) for topic, _, v in producer.sent if topic == worker.results_topic]
    assert len(answers) == 1 and isinstance(answers[0], ToolResult)
    answer = answers[0]
    assert (answer.run_id, answer.step, answer.tool, answer.status) == (
        "p1",
        "kyc",
        "workflow:kyc-check",
        ToolStatus.failed,
    )
    assert answer.error_kind == "child-refused" and "unknown_workflow" in (answer.error or "")
    assert worker.state(kid.run_id) is None  # no child run
    assert any(topic.endswith("dlq") or "dead" in topic for topic, _, _ in producer.sent)
    fold(worker, answer)
    parent = worker.state("p1")
    assert parent is not None and parent.snapshot.step("kyc").status is StepStatus.failed
    assert "child-refused" in (parent.snapshot.step("kyc").error or "")
    fold(worker, kid)  # redelivered: the same answer again, which the parent takes once (its event id)
    again = [codec.decode(v) for topic, _, v in producer.sent if topic == worker.results_topic]
    assert again[-1] == answer
    # A request with no parent answers nobody (a forged one never gets here: authentication comes first).
    assert refusal_result(parent_request("p9"), "unknown_workflow", "x") is None
