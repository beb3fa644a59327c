"""A tool version whose input schema no longer fits a step's arguments is refused with a reason."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from streamagent.processors.decision.arguments import catalogue_check, mismatches
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.state.fold import apply
from streamagent.processors.workflow import default_workflows
from streamagent.tools.crm import Crm
from streamagent.tools.enrich import Enrich
from streamagent.tools.sandbox.apis import company_profile
from test_fold import DEFAULT_DEADLINE_S, requested

from streamagent.catalogue import Announcement, CatalogueState, ToolEntry
from streamagent.events import DecisionAction, DecisionRecorded, StateSnapshot, ToolResult, ToolStatus

NOW = 1_000_000


class AccountV2(BaseModel):  # incompatible: a new required field, employees now a string
    account_id: str
    domain: str
    name: str
    employees: str


class CrmV2(Crm):
    version = "2"
    input_model = AccountV2  # type: ignore[assignment]


def catalogue(*tools: type[Any]) -> CatalogueState:
    state = CatalogueState()
    for tool in tools:
        a: Announcement = tool.declaration(member_id=f"m-{tool.name}", at_ms=NOW, started_at_ms=NOW, lease_ms=60_000)
        assert state.apply(a.key(), a.encode()).outcome == "ok"
    return state


def decider(state: CatalogueState) -> RulesDecider:
    def entry(name: str) -> ToolEntry | None:
        e = state.entry(name, NOW)
        return e if e is not None and e.available else None

    return RulesDecider(
        default_workflows(), available=lambda name: entry(name) is not None, check=catalogue_check(entry)
    )


def at_crm_step() -> StateSnapshot:
    """A run of onboarding-with-crm whose enrich step succeeded: crm is next."""
    wf = default_workflows()["onboarding-with-crm"]
    req = requested(event_id="req-crm", run_id="run-crm").model_copy(update={"workflow": wf.name})
    state = apply(None, req, DEFAULT_DEADLINE_S, wf).state
    events = [
        DecisionRecorded(
            event_id="d1",
            run_id="run-crm",
            decision_id="d1",
            based_on_version=1,
            action=DecisionAction.dispatch,
            step="enrich",
            tool="enrich",
            command_id="c1",
            reason="r",
            decider="rules",
        ),
        ToolResult(
            event_id="r1",
            run_id="run-crm",
            command_id="c1",
            tool="enrich",
            step="enrich",
            status=ToolStatus.succeeded,
            output=company_profile("acme-robotics.io"),
        ),
    ]
    for event in events:
        state = apply(state, event, DEFAULT_DEADLINE_S, wf).state
    return state.snapshot


def test_the_crm_step_is_dispatched_with_arguments_that_fit_the_running_version() -> None:
    decision = decider(catalogue(Enrich, Crm)).decide(at_crm_step())
    assert decision is not None and decision.action is DecisionAction.dispatch, decision
    assert decision.tool == "crm" and decision.arguments["domain"] == "acme-robotics.io"
    assert isinstance(decision.arguments["employees"], int)  # a whole placeholder keeps its type
    assert mismatches(Crm.input_model.model_json_schema(), decision.arguments) == []


def test_an_incompatible_version_is_refused_with_the_tool_version_and_mismatch_not_called() -> None:
    decision = decider(catalogue(Enrich, CrmV2)).decide(at_crm_step())
    assert decision is not None and decision.action is DecisionAction.escalate
    assert decision.arguments == {} and decision.step == "crm"
    assert "tool crm version 2" in decision.reason
    assert "missing required property 'account_id'" in decision.reason
    assert "employees: expected string, got integer" in decision.reason


def test_a_missing_tool_still_waits() -> None:
    decision = decider(catalogue(Enrich)).decide(at_crm_step())
    assert decision is not None and decision.action is DecisionAction.wait
    assert decision.reason == "waiting for tool crm"


def test_the_schema_check_follows_refs_unions_and_closed_objects() -> None:
    schema = {
        "type": "object",
        "properties": {"who": {"$ref": "#/$defs/Who"}, "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
        "required": ["who"],
        "additionalProperties": False,
        "$defs": {"Who": {"type": "object", "properties": {"mail": {"type": "string"}}, "required": ["mail"]}},
    }
    assert mismatches(schema, {"who": {"mail": "a@b.c"}, "n": None}) == []
    assert mismatches(schema, {"who": {}, "n": "x", "extra": 1}) == [
        "missing required property 'mail' in who",
        "n: expected integer, got string",
        "unexpected property 'extra'",
    ]
