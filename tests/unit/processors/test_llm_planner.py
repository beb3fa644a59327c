"""The planner: one plan per run, made at its start, followed by the executor, paid for once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from llm_flow import dead_url, decide, follow, handler, llm, model_settings, workflow_file
from llm_runs import Run
from streamagent.processors.decision.llm.ledger import PlanRecord, RunLedger
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.workflow import ONBOARDING, WorkflowError, load_workflow
from streamagent.tools.sandbox.model import PLAN, Answer, FakeModel
from test_decision_handler import _batch

from streamagent import db
from streamagent.config import Settings
from streamagent.events import DecisionAction

PLANNED = replace(ONBOARDING, decider="llm", planner=True)


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


@pytest.fixture
def llm_db(settings: Settings, model: FakeModel) -> Settings:
    db.migrate(settings, DECISION_SCHEMA)
    return model_settings(settings, model.url)


def _planner_calls(model: FakeModel) -> int:
    return sum(1 for r in model.requests if r.model == "planner-model")


def _executor(model: FakeModel) -> list[list[dict[str, object]]]:
    return [r.messages for r in model.requests if r.model == "test-model"]


def _plan_row(settings: Settings, run_id: str) -> tuple[object, ...]:
    with db.connect(settings) as conn:
        row = conn.execute(
            "SELECT plan, error, model, prompt_tokens, completion_tokens, cost_usd, based_on_version"
            " FROM run_plans WHERE run_id = %s",
            (run_id,),
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_one_plan_per_run_across_decisions_and_a_restart(llm_db: Settings, model: FakeModel) -> None:
    run = Run()
    first = decide(handler(llm_db, PLANNED), run)
    assert _planner_calls(model) == 1 and len(_executor(model)) == 1
    planner_request = next(r for r in model.requests if r.model == "planner-model")
    assert planner_request.tools == [] and planner_request.response_format is None
    assert ONBOARDING.goal in planner_request.messages[0]["content"]
    # The executor was told the plan, after the policy.
    system = _executor(model)[0][0]["content"]
    assert isinstance(system, str) and PLAN in system and system.index("Policy") < system.index(PLAN)
    assert (first.action, first.step) == (DecisionAction.dispatch, "enrich")
    # The first decision carries the plan: in its context, and its tokens and cost in its figures.
    plan, error, planner_model, prompt, completion, cost, version = _plan_row(llm_db, run.snap.run_id)
    assert (plan, error, planner_model, version) == (PLAN, None, "planner-model", 1)
    carried = first.context["plan"]
    assert carried["plan"] == PLAN and carried["carried"] is True and carried["messages"] == planner_request.messages
    assert (carried["prompt_tokens"], carried["completion_tokens"]) == (prompt, completion)
    own_prompt = first.prompt_tokens - int(prompt)  # type: ignore[call-overload]
    own_completion = first.completion_tokens - int(completion)  # type: ignore[call-overload]
    assert own_prompt > 0 and own_completion > 0
    assert first.cost_usd == pytest.approx(float(cost) + (own_prompt * 0.5 + own_completion * 1.5) / 1000, abs=2e-6)  # type: ignore[arg-type]
    assert float(cost) == pytest.approx((int(prompt) * 5 + int(completion) * 15) / 1000, abs=1e-6)  # type: ignore[call-overload]

    follow(run, first)
    same = handler(llm_db, PLANNED)
    second = decide(same, run)
    assert second.step == "jira" and _planner_calls(model) == 1
    assert PLAN in str(_executor(model)[-1][0]["content"])
    assert second.context["plan"] == {
        "plan": PLAN,
        "error": None,
        "model": "planner-model",
        "based_on_version": 1,
        "carried": False,
    }
    calls = model.calls
    same(_batch([run.snap]))  # redelivered: answered from memory, no call at all
    assert model.calls == calls

    follow(run, second)
    restarted = handler(llm_db, PLANNED)  # a new process on the same database
    third = decide(restarted, run)
    assert third.step == "draft" and _planner_calls(model) == 1 and model.calls == calls + 1
    assert PLAN in str(_executor(model)[-1][0]["content"]) and third.context["plan"]["carried"] is False
    # The run's totals (what the decisions table sums) include the plan exactly once.
    with db.connect(llm_db) as conn:
        total = conn.execute(
            "SELECT sum(prompt_tokens) FROM decisions WHERE run_id = %s", (run.snap.run_id,)
        ).fetchone()
    assert total is not None and int(total[0]) == first.prompt_tokens + second.prompt_tokens + third.prompt_tokens


def test_a_plan_made_before_a_crash_is_not_paid_again_and_is_carried(llm_db: Settings, model: FakeModel) -> None:
    run = Run()
    # The decider planned and decided, and the process died before the decision was stored.
    lost = llm(llm_db, PLANNED).decide(run.snap)
    assert lost is not None and _planner_calls(model) == 1
    record = decide(handler(llm_db, PLANNED), run)  # the snapshot, redelivered to a new process
    assert _planner_calls(model) == 1 and len(_executor(model)) == 2
    _, _, _, prompt, _, _, _ = _plan_row(llm_db, run.snap.run_id)
    assert record.context["plan"]["carried"] is True and record.prompt_tokens > int(prompt)  # type: ignore[call-overload]


def test_the_planner_down_the_run_goes_on_without_a_plan(settings: Settings, model: FakeModel) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    down = model_settings(settings, model.url, planner_base_url=dead_url())
    run = Run()
    first = decide(handler(down, PLANNED), run)
    assert (first.action, first.step) == (DecisionAction.dispatch, "enrich")
    assert model.calls == 1 and _planner_calls(model) == 0  # only the executor reached the fake
    error = first.context["plan"]["error"]
    assert first.context["plan"]["plan"] is None and error.startswith("the planner is unavailable: cannot connect")
    assert f"No plan for this run: {error}" in str(_executor(model)[0][0]["content"])
    plan, stored, *_ = _plan_row(down, run.snap.run_id)
    assert plan is None and stored == error
    follow(run, first)
    second = decide(handler(down, PLANNED), run)  # not asked again: the failure is the run's plan
    assert second.step == "jira" and second.context["plan"]["error"] == error


def test_a_garbage_plan_is_no_plan_and_a_long_one_is_cut(llm_db: Settings, model: FakeModel) -> None:
    model.script(Answer.call("enrich", {"domain": "x"}))  # the planner answers a tool call, no text
    garbage = decide(handler(llm_db, PLANNED), Run(run_id="run-garbage"))
    assert garbage.step == "enrich" and garbage.context["plan"]["error"] == "the planner answered no plan (no text)"
    short = model_settings(llm_db, model.url, plan_max_chars=100)
    model.script(Answer.text("step " * 100))
    long = decide(handler(short, PLANNED), Run(run_id="run-long"))
    plan = long.context["plan"]["plan"]
    assert plan.startswith("step step") and plan.endswith("…[truncated 399 chars]") and len(plan) < 130
    assert plan in str(_executor(model)[-1][0]["content"])


def test_no_planner_no_plan_and_no_database(model: FakeModel) -> None:
    # Without a planner or a cap, the decider reads nothing from PostgreSQL (none is configured here).
    settings = Settings(decider="llm", openai_base_url=model.url, model="test-model")
    decision = llm(settings, ONBOARDING).decide(Run().snap)
    assert decision is not None and decision.step == "enrich" and "plan" not in decision.context
    assert "plan" not in str(model.requests[0].messages[0]["content"]).lower()


def test_the_workflow_switches_the_planner_on_and_is_checked(tmp_path: Path) -> None:
    good = workflow_file(tmp_path, ONBOARDING.source, 'decider = "llm"\nplanner = true\n')
    assert load_workflow(good).planner is True
    for header, error in (
        ('planner = "yes"\n', "planner: must be true or false"),
        ('decider = "rules"\nplanner = true\n', "planner: needs the llm decider"),
    ):
        path = workflow_file(tmp_path, ONBOARDING.source, header)
        with pytest.raises(WorkflowError, match=error):
            load_workflow(path)


def test_the_planner_has_its_own_model_and_endpoint() -> None:
    from streamagent.processors.decision.llm.client import ModelClient

    settings = Settings(openai_base_url="http://executor/v1", model="cheap", planner_model="strong")
    planner = ModelClient(settings, role="planner")
    assert (planner.model, str(planner.openai.base_url)) == ("strong", "http://executor/v1/")
    apart = settings.model_copy(update={"planner_base_url": "http://planner/v1", "planner_model": ""})
    planner = ModelClient(apart, role="planner")
    assert (planner.model, str(planner.openai.base_url)) == ("cheap", "http://planner/v1/")
    assert ModelClient(apart).model == "cheap" and str(ModelClient(apart).openai.base_url) == "http://executor/v1/"


def test_the_first_stored_plan_wins(llm_db: Settings) -> None:
    # Two instances planning the same run (a rebalance mid-decision): both use the plan stored first.
    ledger = RunLedger(llm_db.database_url)
    ours = PlanRecord(run_id="r", based_on_version=1, plan="ours", model="m", prompt_tokens=3, audit={"a": 1})
    theirs = ours.model_copy(update={"plan": "theirs", "prompt_tokens": 9})
    assert ledger.save_plan(ours) == ours
    assert ledger.save_plan(theirs) == ours and ledger.plan("r") == ours and ledger.plan("other") is None
