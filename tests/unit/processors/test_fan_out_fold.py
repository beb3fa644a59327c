"""Fan-out and fan-in (issue 22): the workflow's ready steps, the fold taking in a decision that names
several steps, when the fold asks for a decision while steps are in flight, the rules' choice, the guard
per step, the undo order, and the schema (DecisionRecorded v5, older versions still decode)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import pytest
from streamagent.processors.decision.decider import Decision
from streamagent.processors.decision.gating import decide
from streamagent.processors.decision.processor import DecisionHandler
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.guard.stage import GuardStage
from streamagent.processors.state.fold import RunState, apply, needs_decision
from streamagent.processors.workflow import Workflow, WorkflowError, load_workflow
from streamagent.tools.sandbox.model import Answer, FakeModel
from test_decision_handler import LandingProducer, _batch
from test_llm_decider import decider as llm_decider
from test_llm_decider import llm_settings

from streamagent import codec, db
from streamagent.config import Settings
from streamagent.events import (
    CommandResent,
    DecisionAction,
    DecisionRecorded,
    Event,
    ParallelDispatch,
    RunRequested,
    RunStatus,
    StateSnapshot,
    StepStatus,
    ToolCommand,
    ToolResult,
    ToolStatus,
    command_id,
)
from streamagent.policy import PolicyStore
from streamagent.topics import RUN_EVENTS

RUN = "run-fan-1"
T0 = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
_seq = itertools.count(1)

# Two branches of two steps each, then a step that needs both (fan-in).
BRANCHES = """
name = "{name}"
goal = "two branches, then both"
tools = ["enrich", "jira", "email", "slack"]
max_parallel = {max_parallel}
on_branch_failure = "{on_branch_failure}"

[[steps]]
name = "a1"
tool = "jira"
args.key = "{{request.company_name | run_key}}"
args.name = "{{request.company_name}}"
args.lead_email = "{{request.contact_email}}"
compensate.tool = "jira"
compensate.args.key = "{{steps.a1.output.key}}"

[[steps]]
name = "b1"
tool = "enrich"
args.domain = "{{request.company_domain}}"

[[steps]]
name = "a2"
tool = "email"
needs = ["a1"]
args.to = "{{request.contact_email}}"
args.subject = "hi"
args.body = "hello"

[[steps]]
name = "b2"
tool = "jira"
needs = ["b1"]
args.key = "{{request.contact_name | run_key}}"
args.name = "{{request.contact_name}}"
args.lead_email = "{{request.contact_email}}"
compensate.tool = "jira"
compensate.args.key = "{{steps.b2.output.key}}"

[[steps]]
name = "both"
tool = "slack"
needs = ["a2", "b2"]
args.channel = "#x"
args.text = "done"
"""


def workflow(
    tmp_path: Path, max_parallel: int = 2, on_branch_failure: str = "finish", name: str = "branches"
) -> Workflow:
    path = tmp_path / f"{name}.toml"
    path.write_text(BRANCHES.format(name=name, max_parallel=max_parallel, on_branch_failure=on_branch_failure))
    return load_workflow(path)


def _at() -> datetime:
    return T0 + timedelta(seconds=next(_seq))


class Run:
    """A run folded by hand: each decision the rules make is recorded as the processor would."""

    def __init__(self, wf: Workflow) -> None:
        self.wf = wf
        self.decider = RulesDecider(wf)
        self.state: RunState | None = None
        self.published: list[bool] = []
        self._apply(
            RunRequested(
                event_id="req",
                run_id=RUN,
                occurred_at=T0,
                company_name="Northwind",
                company_domain="northwind.io",
                contact_name="Zed Zulu",
                contact_email="zed@northwind.io",
                requested_by="test",
                workflow=wf.name,
            )
        )

    @property
    def snap(self) -> StateSnapshot:
        assert self.state is not None
        return self.state.snapshot

    def _apply(self, event: Event) -> None:
        applied = apply(self.state, event, 600.0, self.wf)
        self.state = applied.state
        self.published.append(applied.publish)

    def record(self, decision: Decision) -> DecisionRecorded:
        snap = self.snap
        decision_id = f"dec-{snap.version}"
        parallel = [
            ParallelDispatch(
                step=d.step or "", tool=d.tool or "", command_id=command_id(RUN, d.step or ""), arguments=d.arguments
            )
            for d in decision.parallel
        ]
        operation = "compensate" if decision.action is DecisionAction.compensate else "execute"
        record = DecisionRecorded(
            event_id=decision_id,
            run_id=RUN,
            occurred_at=_at(),
            decision_id=decision_id,
            based_on_version=snap.version,
            action=decision.action,
            step=decision.step,
            tool=decision.tool,
            command_id=command_id(RUN, decision.step, operation) if decision.step and decision.tool else None,
            arguments=decision.arguments,
            reason=decision.reason,
            decider="rules",
            parallel=parallel,
        )
        self._apply(record)
        return record

    def decide(self) -> Decision | None:
        return self.decider.decide(self.snap)

    def result(
        self, step: str, ok: bool = True, operation: str = "execute", output: dict[str, Any] | None = None
    ) -> None:
        tool = self.wf.step(step).tool
        self._apply(
            ToolResult(
                event_id=f"res-{step}-{operation}-{next(_seq)}",
                run_id=RUN,
                occurred_at=_at(),
                command_id=command_id(RUN, step, operation),
                tool=tool,
                step=step,
                operation=operation,
                status=ToolStatus.succeeded if ok else ToolStatus.failed,
                output=output if output is not None else ({"key": f"K{step.upper()}"} if ok else {}),
                error=None if ok else "recipient rejected",
                error_kind=None if ok else "permanent",
            )
        )

    def status(self, step: str) -> StepStatus:
        return self.snap.step(step).status


def steps_of(decision: Decision | None) -> list[str]:
    assert decision is not None
    return [d.step or "" for d in decision.dispatches()]


def test_a_workflow_declares_max_parallel_and_on_branch_failure(tmp_path: Path) -> None:
    wf = workflow(tmp_path, 3, "stop")
    assert (wf.max_parallel, wf.on_branch_failure) == (3, "stop")
    plain = load_workflow(Path("workflows/onboarding.toml"))
    assert (plain.max_parallel, plain.on_branch_failure) == (1, "finish")  # today's behaviour by default
    for bad, field in (("0", "max_parallel"), ("true", "max_parallel"), ('"all"', "max_parallel")):
        path = tmp_path / "bad.toml"
        path.write_text(BRANCHES.format(name="bad", max_parallel=bad, on_branch_failure="stop"))
        with pytest.raises(WorkflowError, match=field):
            load_workflow(path)
    path = tmp_path / "bad.toml"
    path.write_text(BRANCHES.format(name="bad", max_parallel=2, on_branch_failure="wait"))
    with pytest.raises(WorkflowError, match="on_branch_failure: must be 'finish' or 'stop'"):
        load_workflow(path)


def test_the_reference_workflow_fans_out_after_enrich() -> None:
    wf = load_workflow(Path("workflows/onboarding-parallel.toml"))
    run = Run(wf)
    assert steps_of(run.decide()) == ["enrich"]
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("enrich", output={"industry": "robots", "employees": 10, "country": "NL"})
    assert steps_of(run.decide()) == ["crm", "jira"]


def test_one_decision_dispatches_every_ready_step_and_the_fold_takes_each_in(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path))
    first = run.decide()
    assert steps_of(first) == ["a1", "b1"]
    record = run.record(first)  # type: ignore[arg-type]
    assert [d.step for d in record.dispatched()] == ["a1", "b1"]
    assert run.status("a1") is run.status("b1") is StepStatus.dispatched
    assert run.snap.step("b1").command_id == command_id(RUN, "b1")
    assert run.snap.tool_calls == 2  # each command counts against the budget
    assert run.published[-1] is False  # both in flight, nothing else ready: no snapshot
    assert run.decide() is None


def test_a_result_while_the_other_branch_runs_starts_that_branch_s_next_step(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path))
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("a1")
    assert run.published[-1] is True  # a2 is ready and there is room beside b1
    assert steps_of(run.decide()) == ["a2"]
    run.record(run.decide())  # type: ignore[arg-type]
    assert run.published[-1] is False  # two in flight: max_parallel reached
    run.result("b1")
    assert steps_of(run.decide()) == ["b2"]
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("a2")
    # Fan-in: "both" needs a2 and b2; b2 is in flight, so nothing is asked.
    assert run.published[-1] is False
    run.result("b2")
    assert run.published[-1] is True
    assert steps_of(run.decide()) == ["both"]
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("both")
    done = run.decide()
    assert done is not None and done.action is DecisionAction.complete


def test_max_parallel_bounds_what_one_decision_starts(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path, max_parallel=1))
    assert steps_of(run.decide()) == ["a1"]  # one at a time: today's behaviour
    run.record(run.decide())  # type: ignore[arg-type]
    assert run.published[-1] is False and run.decide() is None


def test_a_stale_fan_out_is_superseded_and_a_redelivered_one_changes_nothing(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path))
    record = run.record(run.decide())  # type: ignore[arg-type]
    before = run.snap
    run._apply(record)  # the same event again: remembered by id
    assert run.snap == before
    again = record.model_copy(update={"event_id": "other", "decision_id": "dec-other"})
    run._apply(again)
    assert run.snap.superseded_decisions == 1 and run.snap.tool_calls == 2


def test_a_result_folded_before_its_fan_out_decision_is_kept(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path))
    decision = run.decide()
    run.result("b1")  # the results topic was read first
    assert run.status("b1") is StepStatus.succeeded and run.snap.step("b1").decision_id is None
    assert needs_decision(run.snap, run.wf) is False  # a result waits for its decision
    run.record(decision)  # type: ignore[arg-type]
    assert run.status("b1") is StepStatus.succeeded and run.status("a1") is StepStatus.dispatched
    assert run.snap.step("b1").decision_id == run.snap.step("a1").decision_id


def test_stop_starts_nothing_after_a_branch_fails_then_undoes_last_started_first(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path, on_branch_failure="stop"))
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("a1")
    run.record(run.decide())  # type: ignore[arg-type]  # a2
    run.result("a2", ok=False)  # branch a fails for good while b1 runs
    assert run.decide() is None  # b1 still in flight: nothing starts, nothing ends yet
    run.result("b1")
    ended = run.decide()
    assert ended is not None and ended.action is DecisionAction.fail and ended.step == "a2"
    assert run.status("b2") is StepStatus.pending  # never started
    run.record(ended)
    assert run.snap.status is RunStatus.failed
    undo = run.decide()
    assert undo is not None and (undo.action, undo.step) == (DecisionAction.compensate, "a1")
    run.record(undo)
    run.result("a1", operation="compensate")
    assert run.decide() is None  # b1 has no undo; nothing left


def test_finish_lets_the_other_branch_finish_then_undoes_both(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path, on_branch_failure="finish"))
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("a1")
    run.record(run.decide())  # type: ignore[arg-type]  # a2
    run.result("a2", ok=False)
    assert run.decide() is None
    run.result("b1")
    assert steps_of(run.decide()) == ["b2"]  # the other branch goes on
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("b2")
    ended = run.decide()
    assert ended is not None and ended.action is DecisionAction.fail
    run.record(ended)
    undone = []
    while (undo := run.decide()) is not None:
        assert undo.action is DecisionAction.compensate
        undone.append(undo.step)
        run.record(undo)
        run.result(undo.step or "", operation="compensate")
    assert undone == ["b2", "a1"]  # the one started last first
    assert run.status("b2") is run.status("a1") is StepStatus.compensated


def test_a_run_of_one_step_at_a_time_keeps_what_it_created_when_a_step_fails(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path, max_parallel=1))
    run.record(run.decide())  # type: ignore[arg-type]  # a1
    run.result("a1")
    run.record(run.decide())  # type: ignore[arg-type]  # b1
    run.result("b1")
    run.record(run.decide())  # type: ignore[arg-type]  # a2
    run.result("a2", ok=False)
    ended = run.decide()
    assert ended is not None and ended.action is DecisionAction.fail
    run.record(ended)
    assert run.decide() is None  # graceful degradation, as before fan-out


def test_an_approval_gated_step_waits_alone_while_the_other_starts(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.toml").write_text(
        '[[approvals.rules]]\ntool = "email"\nreason = "mails need a person"\n'
    )
    wf = workflow(tmp_path)
    run = Run(wf)
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("a1")
    run.result("b1")
    guard = GuardStage(Settings(), policies=PolicyStore(tmp_path / "policies", 0))
    proposal, verdict = decide(run.decider, guard, run.snap)
    assert steps_of(proposal) == ["a2", "b2"]
    assert verdict is not None and steps_of(verdict.decision) == ["b2"]  # a2 held: left for later
    assert "a2 left for later" in verdict.decision.reason
    run.record(verdict.decision)
    assert run.published[-1] is True  # a2 is ready and there is room
    proposal, verdict = decide(run.decider, guard, run.snap)
    assert steps_of(proposal) == ["a2"]
    assert verdict is not None and verdict.decision.action is DecisionAction.wait and verdict.ask is not None


def test_a_tool_calls_budget_counts_each_step_of_a_fan_out(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "b.toml").write_text("[budgets]\nmax_tool_calls = 1\n")
    run = Run(workflow(tmp_path))
    guard = GuardStage(Settings(), policies=PolicyStore(tmp_path / "policies", 0))
    _, verdict = decide(run.decider, guard, run.snap)
    assert verdict is not None and steps_of(verdict.decision) == ["a1"]


def test_decision_recorded_v5_round_trips_and_older_versions_decode(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path))
    record = run.record(run.decide())  # type: ignore[arg-type]
    record = record.model_copy(update={"context": {"x": 1}})
    encoded = codec.encode(record)
    assert codec.decode(encoded) == record
    landed = codec.decode(codec.with_landings(encoded, {command_id(RUN, "a1"): (1, 7), command_id(RUN, "b1"): (2, 9)}))
    assert isinstance(landed, DecisionRecorded)
    assert [(d.command_partition, d.command_offset) for d in landed.dispatched()] == [(1, 7), (2, 9)]
    # An event written with the previous schema (v4) decodes with no parallel steps.
    old = [e for e in codec.registry().by_fingerprint.values() if e.name.endswith("DecisionRecorded") and not e.current]
    v4 = next(e for e in old if any(f["name"] == "memory" for f in e.parsed["fields"]))
    written = codec.encode(record.model_copy(update={"parallel": [], "schema_version": 4}), schema=v4)
    decoded = codec.decode(written)
    assert isinstance(decoded, DecisionRecorded) and decoded.parallel == [] and decoded.step == "a1"
    assert fastavro.schema.to_parsing_canonical_form(v4.parsed) != fastavro.schema.to_parsing_canonical_form(
        codec.registry().current[v4.name].parsed
    )


def test_the_handler_stores_a_fan_out_once_sends_each_command_and_re_sends_only_the_lost_one(
    settings: Settings, tmp_path: Path
) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    wf = workflow(tmp_path)
    run = Run(wf)
    producer = LandingProducer()
    handler = DecisionHandler(settings, RulesDecider(wf), producer)  # type: ignore[arg-type]
    handler(_batch([run.snap]))
    events = settings.topic(RUN_EVENTS)
    commands = [(t, v) for t, v in producer.sent if t != events]
    decoded = [codec.decode(v) for _, v in commands]
    assert [(c.step, c.tool) for c in decoded if isinstance(c, ToolCommand)] == [("a1", "jira"), ("b1", "enrich")]
    assert len({c.decision_id for c in decoded if isinstance(c, ToolCommand)}) == 1  # one decision, two commands
    (record,) = [codec.decode(v) for t, v in producer.sent if t == events]
    assert isinstance(record, DecisionRecorded)
    # Produced after both commands were acknowledged, carrying where each landed (the loss checks' evidence).
    assert [(d.step, d.command_offset) for d in record.dispatched()] == [("a1", 0), ("b1", 0)]

    producer.sent.clear()
    handler(_batch([run.snap]))  # redelivered: the recorded bytes again, nothing decided anew
    assert [(t, v) for t, v in producer.sent if t != events] == commands

    # b1's command is found lost: exactly its recorded bytes go again, also after a restart (no memory).
    lost = run.snap.model_copy(update={"version": run.snap.version + 2, "redrive_command_id": decoded[1].command_id})
    for fresh in (handler, DecisionHandler(settings, RulesDecider(wf), producer)):  # type: ignore[arg-type]
        producer.sent.clear()
        fresh(_batch([lost]))
        assert [(t, v) for t, v in producer.sent if t != events] == [commands[1]]
        (resent,) = [codec.decode(v) for t, v in producer.sent if t == events]
        assert isinstance(resent, CommandResent) and (resent.step, resent.tool) == ("b1", "enrich")


def test_the_model_answers_two_calls_and_one_decision_starts_both(tmp_path: Path) -> None:
    wf = workflow(tmp_path)
    run = Run(wf)
    jira = {"key": "NORT123456", "name": "Northwind", "lead_email": "zed@northwind.io"}
    with FakeModel() as model:
        model.script(Answer.calls(("jira", jira), ("enrich", {"domain": "northwind.io"})))
        decision = llm_decider(llm_settings(model.url), wf).decide(run.snap)
        prompt = model.requests[0]
    assert decision is not None and steps_of(decision) == ["a1", "b1"]
    assert decision.arguments == jira and decision.parallel[0].arguments == {"domain": "northwind.io"}
    assert [c["function"]["name"] for c in decision.context["answers"][0]["tool_calls"]] == ["jira", "enrich"]
    system, user = (m["content"] for m in prompt.messages)
    assert "call every ready step in one answer" in system and "at most 2 calls" in user
    described = {t["function"]["name"]: t["function"]["description"] for t in prompt.body["tools"]}
    assert described["jira"].startswith("Ready now: step a1.") and described["email"].startswith("No step")


def test_one_valid_and_one_invalid_call_the_valid_stands_and_the_other_is_repaired_or_falls_back(
    tmp_path: Path,
) -> None:
    wf = workflow(tmp_path)
    run = Run(wf)
    jira = {"key": "NORT123456", "name": "Northwind", "lead_email": "zed@northwind.io"}
    with FakeModel() as model:
        model.script(
            Answer.calls(("jira", jira), ("enrich", {"domain": 42})),
            Answer.call("enrich", {"domain": "northwind.io"}),
        )
        repaired = llm_decider(llm_settings(model.url), wf).decide(run.snap)
        repair_turn = model.requests[1].messages[-1]["content"]
        model.script(Answer.calls(("jira", jira), ("enrich", {"domain": 42})), Answer.call("nope"))
        fell_back = llm_decider(llm_settings(model.url), wf).decide(run.snap)
    assert repaired is not None and steps_of(repaired) == ["a1", "b1"] and repaired.context["fallback"] is None
    assert "Accepted: the calls for a1" in repair_turn
    assert repaired.parallel[0].arguments == {"domain": "northwind.io"}
    # Refused twice: the valid call still runs; the rules start the other ready step beside it.
    assert fell_back is not None and steps_of(fell_back) == ["a1", "b1"] and fell_back.arguments == jira
    assert fell_back.context["fallback"] == "rules" and fell_back.parallel[0].reason.startswith("fallback to rules")


TWO_PROJECTS = """
name = "two-projects"
goal = "two undoable steps at once, then a mail"
tools = ["jira", "email"]
max_parallel = 2
[[steps]]
name = "x"
tool = "jira"
args.key = "{request.company_name | run_key}"
compensate.tool = "jira"
compensate.args.key = "{steps.x.output.key}"
[[steps]]
name = "y"
tool = "jira"
args.key = "{request.contact_name | run_key}"
compensate.tool = "jira"
compensate.args.key = "{steps.y.output.key}"
[[steps]]
name = "z"
tool = "email"
needs = ["x", "y"]
args.to = "{request.contact_email}"
"""


def test_a_failed_fan_out_is_undone_last_finished_first(tmp_path: Path) -> None:
    path = tmp_path / "two-projects.toml"
    path.write_text(TWO_PROJECTS)
    run = Run(load_workflow(path))
    run.record(run.decide())  # type: ignore[arg-type]  # x and y started by one decision
    run.result("y")  # y finishes first,
    run.result("x")  # x last
    assert run.snap.step("x").finished_at > run.snap.step("y").finished_at  # type: ignore[operator]
    run.record(run.decide())  # type: ignore[arg-type]  # z
    run.result("z", ok=False)
    run.record(run.decide())  # type: ignore[arg-type]  # the run fails
    undone = []
    while (undo := run.decide()) is not None:
        undone.append(undo.step)
        run.record(undo)
        run.result(undo.step or "", operation="compensate")
    assert undone == ["x", "y"]


def test_state_snapshot_v5_carries_when_steps_finished_and_v4_still_decodes(tmp_path: Path) -> None:
    run = Run(workflow(tmp_path))
    run.record(run.decide())  # type: ignore[arg-type]
    run.result("a1")
    snap = run.snap
    assert codec.decode(codec.encode(snap)) == snap and snap.step("a1").finished_at is not None
    older = [e for e in codec.registry().by_fingerprint.values() if e.name.endswith("StateSnapshot") and not e.current]
    v4 = next(e for e in older if "approvals" in json.dumps(e.parsed) and "finished_at" not in json.dumps(e.parsed))
    old = codec.decode(codec.encode(snap.model_copy(update={"schema_version": 4}), schema=v4))
    assert isinstance(old, StateSnapshot) and old.step("a1").finished_at is None
