"""The plan is part of the run's state: folded from the decision that recorded it, carried by every
later snapshot, shown to the executor from there, and printed by ``streamagent show``."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from llm_flow import decide, follow, handler, llm, model_settings
from llm_runs import Run
from streamagent.processors.decision.llm.context import OfferedTool, build_messages
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.projection.queries import RunRow, TimelineEntry
from streamagent.processors.state.fold import RunState
from streamagent.processors.workflow import ONBOARDING
from streamagent.tools.sandbox.model import PLAN, FakeModel

from streamagent import codec, db
from streamagent.config import Settings
from streamagent.console.timeline import plan_of, print_timeline
from streamagent.events import DecisionAction, DecisionRecorded, RunPlan

PLANNED = replace(ONBOARDING, decider="llm", planner=True)
OFFERED = [OfferedTool(name) for name in ONBOARDING.tools]


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


def plan_context(plan: str | None = PLAN, error: str | None = None, carried: bool = True) -> dict[str, Any]:
    """What the llm decider records in ``context["plan"]`` (see decider._Audit._plan)."""
    return {"plan": {"plan": plan, "error": error, "model": "planner-model", "based_on_version": 1, "carried": carried}}


def recorded(run: Run, context: dict[str, Any], step: str = "enrich") -> DecisionRecorded:
    version = run.snap.version
    return DecisionRecorded(
        event_id=f"dec-{version}",
        run_id=run.snap.run_id,
        occurred_at=run.clock,
        decision_id=f"dec-{version}",
        based_on_version=version,
        action=DecisionAction.dispatch,
        step=step,
        tool=step,
        command_id=f"cmd-{step}",
        arguments={"domain": "acme-robotics.io"},
        reason="model",
        decider="llm",
        context=context,
    )


# -- the fold ----------------------------------------------------------------------------------------
def test_the_fold_keeps_the_plan_of_the_first_decision_that_recorded_one() -> None:
    run = Run()
    assert run.snap.plan is None
    run._apply(recorded(run, {"plan": {"plan": None, "error": "the planner has not written it yet", "carried": False}}))
    assert run.snap.plan is None  # "not written yet" (no model) is no plan
    run.result("enrich", {"industry": "robotics"})
    run._apply(recorded(run, plan_context(), step="jira"))
    first = run.snap.plan
    assert first == RunPlan(plan=PLAN, model="planner-model", based_on_version=1, decision_id="dec-3")
    run.result("jira", {"key": "ACME1"})
    # A later decision recording another plan (or none) does not replace the run's plan.
    run._apply(recorded(run, plan_context(plan="something else", carried=False), step="email"))
    run.result("email", {"message_id": "m"})
    run._apply(recorded(run, {}, step="slack"))
    assert run.snap.plan == first and run.snap.version == 8
    # It survives the state table (JSON) and the snapshot topic (Avro).
    assert RunState.model_validate_json(run.state.model_dump_json()).snapshot.plan == first
    again = codec.decode(codec.encode(run.snap))
    assert again == run.snap


def test_a_failed_planner_is_the_runs_plan_too() -> None:
    run = Run()
    run._apply(recorded(run, plan_context(plan=None, error="the planner is unavailable: HTTP 503")))
    assert run.snap.plan is not None
    assert (run.snap.plan.plan, run.snap.plan.error) == (None, "the planner is unavailable: HTTP 503")


def test_a_rules_decision_leaves_no_plan() -> None:
    run = Run()
    run.dispatch("enrich", {"domain": "acme-robotics.io"})
    assert run.snap.plan is None


# -- the context builder -----------------------------------------------------------------------------
def test_the_context_shows_the_plan_the_state_carries() -> None:
    run = Run()
    bare = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=6000)
    assert "Plan for this run" not in bare.messages[0]["content"]
    run._apply(recorded(run, plan_context()))
    system = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=6000).messages[0]["content"]
    assert PLAN in system and system.index("Policy") < system.index(PLAN)
    # An explicit plan (the decider's, from the planner just now) wins over the state's.
    mine = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=6000, plan="mine").messages[0]["content"]
    assert "mine" in mine and PLAN not in mine
    failed = Run()
    failed._apply(recorded(failed, plan_context(plan=None, error="the planner failed: boom")))
    system = build_messages(failed.snap, ONBOARDING, OFFERED, budget_tokens=6000).messages[0]["content"]
    assert "No plan for this run: the planner failed: boom." in system


# -- the executor reads the plan from the state ------------------------------------------------------
def _dead_database() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://nobody@127.0.0.1:{port}/nothing?connect_timeout=1"


def test_the_executor_follows_the_states_plan_without_reading_the_table(model: FakeModel) -> None:
    run = Run()
    run._apply(recorded(run, plan_context()))
    run.result("enrich", {"industry": "robotics", "employees": 120})
    # No PostgreSQL at all: a decider that looked the plan up in run_plans would fail.
    settings = model_settings(Settings(database_url=_dead_database()), model.url)
    decision = llm(settings, PLANNED).decide(run.snap)
    assert decision is not None and decision.step == "jira"
    assert model.calls == 1 and model.requests[0].model == "test-model"  # no planner call
    assert PLAN in str(model.requests[0].messages[0]["content"])
    assert decision.context["plan"] == {
        "plan": PLAN,
        "error": None,
        "model": "planner-model",
        "based_on_version": 1,
        "carried": False,
    }


def test_through_the_handler_the_plan_is_folded_and_used_later(settings: Settings, model: FakeModel) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    chosen = model_settings(settings, model.url)
    run = Run()
    first = decide(handler(chosen, PLANNED), run)
    assert first.context["plan"]["carried"] is True
    follow(run, first)  # the state processor's fold
    assert run.snap.plan is not None and run.snap.plan.plan == PLAN
    assert run.snap.plan.decision_id == first.decision_id
    with db.connect(settings) as conn:
        conn.execute("DELETE FROM run_plans")  # the state alone carries it now
    second = decide(handler(chosen, PLANNED), run)
    assert second.step == "jira" and second.context["plan"]["plan"] == PLAN
    assert sum(1 for r in model.requests if r.model == "planner-model") == 1  # not planned again
    assert PLAN in str(model.requests[-1].messages[0]["content"])


# -- streamagent show --------------------------------------------------------------------------------
def _entry(payload: dict[str, Any], kind: str = "DecisionRecorded") -> TimelineEntry:
    return TimelineEntry(
        occurred_at=datetime(2026, 12, 2, tzinfo=UTC),
        type=kind,
        step="enrich",
        summary="decided",
        event_id="e",
        causation_id=None,
        payload=payload,
    )


def test_show_prints_the_runs_plan(capsys: pytest.CaptureFixture[str]) -> None:
    run = Run()
    entries = [
        _entry({"decision_id": "d-0", "context": {}}),
        _entry({"decision_id": "d-1", "decider": "llm", "context": plan_context()}),
        _entry({"decision_id": "d-2", "decider": "llm", "context": plan_context(plan="later", carried=False)}),
    ]
    assert plan_of(entries) == RunPlan(plan=PLAN, model="planner-model", based_on_version=1, decision_id="d-1")
    row = RunRow(
        run_id=run.snap.run_id,
        company_name="Acme",
        status="running",
        steps_done=0,
        failed_step=None,
        reason=None,
        created_at=None,
        ended_at=None,
    )
    print_timeline(row, entries, {})
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"plan (planner-model, made on state v1): {PLAN}"
    failed = plan_context(plan=None, error="the planner failed: x")
    print_timeline(row, [_entry({"decision_id": "d", "context": failed})], {})
    assert "plan (planner-model, made on state v1): none, the planner failed: x" in capsys.readouterr().out
    print_timeline(row, [_entry({"decision_id": "d", "context": {}})], {})
    assert "plan" not in capsys.readouterr().out
