"""The rules decider walks the onboarding workflow; later steps use earlier steps' results."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from streamagent.processors.decision.decider import Decision
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.state.fold import RunState, apply
from streamagent.processors.workflow import ONBOARDING, project_key
from streamagent.tools import builtin_tools
from streamagent.tools.sandbox.apis import company_profile

from streamagent import codec
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    Event,
    RunDeadlineExceeded,
    RunRequested,
    RunStatus,
    StateSnapshot,
    StepStatus,
    ToolResult,
    ToolStatus,
)

RUN = "0b6f9d0e-4a43-4d4b-9d55-3f1c5a7e2c10"
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
COMPANY = "Acme Robotics"
DOMAIN = "acme-robotics.io"
CONTACT = "ada@acme-robotics.io"
JIRA_KEY_RE = re.compile(r"^[A-Z][A-Z0-9]{1,9}$")
DECIDER = RulesDecider()
STEP_INDEX = {name: i for i, name in enumerate(ONBOARDING.step_names)}


def sandbox_output(step: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """What each sandbox API answers, as the tools turn it into a step output."""
    if step == "enrich":
        return company_profile(arguments["domain"])
    if step == "jira":
        return {"id": "10001", "key": arguments["key"], "url": "http://sandbox.test/jira/rest/api/3/project/10001"}
    if step == "draft":  # no model configured: the workflow's template
        return {
            "subject": arguments["template_subject"],
            "body": arguments["template_body"],
            "drafted_by": "template",
            "fallback_reason": "no model configured (OPENAI_BASE_URL is empty)",
        }
    if step == "email":
        return {"message_id": "5d0e8a8c-msg-42", "to": arguments["to"]}
    if step == "slack":
        return {"channel": arguments["channel"], "ts": "1714554000.000007"}
    raise AssertionError(step)


class Run:
    """Drives the fold with the decider's decisions and sandbox-like tool results."""

    def __init__(self, run_id: str = RUN, deadline_s: float | None = None) -> None:
        self.clock = T0
        self.state: RunState = apply(
            None,
            RunRequested(
                event_id=f"{run_id}-requested",
                run_id=run_id,
                occurred_at=T0,
                company_name=COMPANY,
                company_domain=DOMAIN,
                contact_name="Ada Lovelace",
                contact_email=CONTACT,
                goal="onboard new B2B client",
                requested_by="crm",
                deadline_s=deadline_s,
            ),
            600.0,
        ).state

    @property
    def snap(self) -> StateSnapshot:
        return self.state.snapshot

    def _apply(self, event: Event) -> None:
        self.state = apply(self.state, event, 600.0).state

    def _tick(self) -> datetime:
        self.clock += timedelta(milliseconds=10)
        return self.clock

    def record(self, decision: Decision) -> str | None:
        """Fold the DecisionRecorded of a decision; returns its command id for a dispatch."""
        version = self.snap.version
        command_id = f"cmd-{decision.step}" if decision.action is DecisionAction.dispatch else None
        self._apply(
            DecisionRecorded(
                event_id=f"dec-{version}",
                run_id=self.snap.run_id,
                occurred_at=self._tick(),
                decision_id=f"dec-{version}",
                based_on_version=version,
                action=decision.action,
                step=decision.step,
                tool=decision.tool,
                command_id=command_id,
                arguments=decision.arguments,
                reason=decision.reason,
                decider=DECIDER.name,
                context=decision.context,
            )
        )
        return command_id

    def result(self, step: str, command_id: str, output: dict[str, Any] | None, error: str | None = None) -> None:
        self._apply(
            ToolResult(
                event_id=f"res-{command_id}",
                run_id=self.snap.run_id,
                occurred_at=self._tick(),
                command_id=command_id,
                tool=step,
                step=step,
                status=ToolStatus.succeeded if error is None else ToolStatus.failed,
                output=output or {},
                error=error,
                error_kind=None if error is None else "permanent",
            )
        )

    def step_through(self, steps: int) -> list[Decision]:
        """Dispatch and succeed the next ``steps`` steps; returns the dispatch decisions."""
        decisions = []
        for _ in range(steps):
            decision = DECIDER.decide(self.snap)
            assert decision is not None and decision.action is DecisionAction.dispatch
            assert decision.step is not None
            command_id = self.record(decision)
            assert command_id is not None
            self.result(decision.step, command_id, sandbox_output(decision.step, decision.arguments))
            decisions.append(decision)
        return decisions


def test_walks_the_onboarding_steps_in_order_then_completes() -> None:
    run = Run()
    seen: list[tuple[str | None, str | None]] = []
    for _ in range(len(ONBOARDING.steps)):
        decision = DECIDER.decide(run.snap)
        assert decision is not None
        assert decision.action is DecisionAction.dispatch
        seen.append((decision.step, decision.tool))
        command_id = run.record(decision)
        assert command_id is not None and decision.step is not None
        assert run.snap.step(decision.step).status is StepStatus.dispatched
        assert DECIDER.decide(run.snap) is None  # waits while the step is dispatched
        run.result(decision.step, command_id, sandbox_output(decision.step, decision.arguments))
    assert seen == [("enrich", "enrich"), ("jira", "jira"), ("draft", "draft"), ("email", "email"), ("slack", "slack")]
    final = DECIDER.decide(run.snap)
    assert final is not None
    assert final.action is DecisionAction.complete
    assert final.step is None
    run.record(final)
    assert run.snap.status is RunStatus.completed
    assert DECIDER.decide(run.snap) is None


def test_later_steps_use_earlier_results() -> None:
    run = Run()
    enrich, jira, draft, email, slack = run.step_through(5)
    profile = company_profile(DOMAIN)
    key = project_key(COMPANY, RUN)

    assert enrich.arguments == {"domain": DOMAIN}

    assert jira.arguments["key"] == key
    assert COMPANY in jira.arguments["name"]
    assert profile["industry"] in jira.arguments["description"]
    assert f"{profile['employees']} employees" in jira.arguments["description"]
    assert jira.arguments["lead_email"] == CONTACT

    assert draft.arguments["company_name"] == COMPANY and draft.arguments["jira_key"] == key
    assert draft.arguments["contact_name"] == "Ada Lovelace" and draft.arguments["industry"] == profile["industry"]
    # The mail is the draft's output (here the template: no model is configured).
    assert email.arguments["to"] == CONTACT
    assert COMPANY in email.arguments["subject"]
    assert key in email.arguments["body"]
    assert profile["industry"] in email.arguments["body"]

    assert slack.arguments["channel"] == "#onboarding"
    assert key in slack.arguments["text"]
    assert profile["industry"] in slack.arguments["text"]
    assert "5d0e8a8c-msg-42" in slack.arguments["text"]
    assert CONTACT in slack.arguments["text"]


def test_every_dispatch_is_valid_input_of_its_tool() -> None:
    tools = builtin_tools()
    for decision in Run().step_through(5):
        assert decision.tool is not None
        tools[decision.tool]().parse(decision.arguments)  # raises PermanentError if not


def test_decisions_are_a_pure_function_of_the_snapshot() -> None:
    run = Run()
    run.step_through(2)
    assert DECIDER.decide(run.snap) == DECIDER.decide(run.snap.model_copy())


@pytest.mark.parametrize("status", [RunStatus.completed, RunStatus.failed, RunStatus.escalated])
def test_no_decision_for_a_terminal_run(status: RunStatus) -> None:
    run = Run()
    run.step_through(1)
    assert DECIDER.decide(run.snap) is not None
    assert DECIDER.decide(run.snap.model_copy(update={"status": status})) is None


@pytest.mark.parametrize(
    ("step", "action"),
    [
        ("enrich", DecisionAction.fail),
        ("jira", DecisionAction.fail),
        ("email", DecisionAction.fail),
        ("slack", DecisionAction.escalate),
    ],
)
def test_a_failed_step_fails_or_escalates_the_run_per_its_on_failure(step: str, action: DecisionAction) -> None:
    assert ONBOARDING.step(step).on_failure == action.value
    run = Run()
    run.step_through(STEP_INDEX[step])
    decision = DECIDER.decide(run.snap)
    assert decision is not None and decision.step == step
    command_id = run.record(decision)
    assert command_id is not None
    run.result(step, command_id, None, error="API answered 400: nope")

    ending = DECIDER.decide(run.snap)
    assert ending is not None
    assert ending.action is action
    assert ending.step == step
    assert step in ending.reason and "API answered 400: nope" in ending.reason
    run.record(ending)
    assert run.snap.status is (RunStatus.failed if action is DecisionAction.fail else RunStatus.escalated)
    assert run.snap.results() == {
        name: run.snap.step(name).output for name in ONBOARDING.step_names[: STEP_INDEX[step]]
    }


@pytest.mark.parametrize("dispatched", [False, True])
def test_deadline_exceeded_escalates(dispatched: bool) -> None:
    run = Run(deadline_s=5.0)
    run.step_through(1)
    if dispatched:
        decision = DECIDER.decide(run.snap)
        assert decision is not None
        run.record(decision)
        assert DECIDER.decide(run.snap) is None
    run._apply(RunDeadlineExceeded(run_id=RUN, occurred_at=T0 + timedelta(seconds=6), deadline_at=run.snap.deadline_at))
    decision = DECIDER.decide(run.snap)
    assert decision is not None
    assert decision.action is DecisionAction.escalate
    assert "deadline" in decision.reason
    assert decision.step is None


# -- project keys ------------------------------------------------------------------------------------
RUN_IDS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"run-{i}")) for i in range(8)]


@pytest.mark.parametrize(
    "company", ["Acme Robotics", "Globex", "x", "", "123 Holdings", "Ölwerk Gmbh", "a-b c.d/e", "ZZZZZZZZZZZZZZ"]
)
@pytest.mark.parametrize("run_id", RUN_IDS[:3])
def test_project_key_is_a_valid_jira_key(company: str, run_id: str) -> None:
    key = project_key(company, run_id)
    assert 2 <= len(key) <= 10
    assert JIRA_KEY_RE.match(key), key
    assert key == project_key(company, run_id)  # stable


def test_project_key_differs_per_run_and_is_stable_per_run() -> None:
    keys = [project_key(COMPANY, run_id) for run_id in RUN_IDS]
    assert len(set(keys)) == len(RUN_IDS)
    assert keys == [project_key(COMPANY, run_id) for run_id in RUN_IDS]
    assert all(key.startswith("ACME") for key in keys)


def test_project_keys_do_not_collide_across_many_runs_of_the_same_company() -> None:
    run_ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"acme-run-{i}")) for i in range(1000)]
    keys = {project_key(COMPANY, run_id) for run_id in run_ids}
    assert len(keys) == len(run_ids)


# -- the context the decision records ----------------------------------------------------------------
def test_the_decision_context_holds_what_the_audit_trail_needs() -> None:
    run = Run()
    run.step_through(1)
    decision = DECIDER.decide(run.snap)
    assert decision is not None and decision.step == "jira"
    context = decision.context
    assert context["request"] == run.snap.request.model_dump()
    assert context["request"]["company_name"] == COMPANY
    assert context["steps"] == {
        "enrich": "succeeded",
        "jira": "pending",
        "draft": "pending",
        "email": "pending",
        "slack": "pending",
    }
    assert context["results"] == {"enrich": company_profile(DOMAIN)}
    assert context["available_tools"] == sorted({"enrich", "jira", "draft", "email", "slack"})
    assert context["version"] == run.snap.version
    assert context["run_id"] == RUN

    # It survives the trip through the log inside DecisionRecorded.
    record = DecisionRecorded(
        run_id=RUN,
        decision_id="d",
        based_on_version=run.snap.version,
        action=decision.action,
        step=decision.step,
        arguments=decision.arguments,
        reason=decision.reason,
        decider="rules",
        context=context,
    )
    decoded = codec.decode(codec.encode(record))
    assert isinstance(decoded, DecisionRecorded)
    assert decoded.context == json.loads(json.dumps(context))
    assert decoded.arguments == decision.arguments


@pytest.mark.parametrize("kind", ["dispatch", "fail", "escalate", "complete"])
def test_every_kind_of_decision_carries_the_context(kind: str) -> None:
    run = Run()
    if kind == "dispatch":
        decision = DECIDER.decide(run.snap)
    elif kind == "complete":
        run.step_through(len(ONBOARDING.steps))
        decision = DECIDER.decide(run.snap)
    elif kind == "escalate":
        run._apply(RunDeadlineExceeded(run_id=RUN, deadline_at=run.snap.deadline_at))
        decision = DECIDER.decide(run.snap)
    else:
        first = DECIDER.decide(run.snap)
        assert first is not None
        command_id = run.record(first)
        assert command_id is not None
        run.result("enrich", command_id, None, error="404 company not found")
        decision = DECIDER.decide(run.snap)
        assert decision is not None
        assert decision.context["errors"] == {"enrich": "permanent: 404 company not found"}
    assert decision is not None and decision.action.value == kind
    assert {"request", "steps", "results", "available_tools"} <= set(decision.context)
    assert decision.context["steps"] == {s.name: s.status.value for s in run.snap.steps}


def test_an_abandoned_run_undoes_its_jira_project_and_a_failed_one_keeps_it() -> None:
    run = Run()
    run.step_through(2)  # enrich and jira succeeded
    key = run.snap.step("jira").output["key"]
    abandoned = run.snap.model_copy(update={"status": RunStatus.escalated, "deadline_exceeded": True})
    undo = DECIDER.decide(abandoned)
    assert undo is not None and undo.action is DecisionAction.compensate
    assert (undo.step, undo.tool, undo.arguments) == ("jira", "jira", {"key": key})
    # A run that failed on a step keeps (and reports) what it created.
    assert DECIDER.decide(run.snap.model_copy(update={"status": RunStatus.failed})) is None
    # One undo at a time, and none once it is under way.
    steps = [
        s.model_copy(update={"status": StepStatus.compensating}) if s.name == "jira" else s for s in abandoned.steps
    ]
    assert DECIDER.decide(abandoned.model_copy(update={"steps": steps})) is None
