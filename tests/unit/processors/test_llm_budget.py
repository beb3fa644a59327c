"""The per-run token and cost caps: checked before every model call, on what the run's recorded
decisions spent plus an estimate of the call; over a cap the run escalates and the model is not asked."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from llm_flow import decide, follow, handler, llm, model_settings, workflow_file
from llm_runs import Run, output_of
from streamagent.processors.decision.llm.budget import Caps, Spending
from streamagent.processors.decision.llm.ledger import RunLedger
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.workflow import ONBOARDING, WorkflowError, load_workflow
from streamagent.tools.sandbox.model import Answer, FakeModel

from streamagent import codec, db
from streamagent.authn import tool_keys
from streamagent.config import Settings
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    FailureStatus,
    RunFailed,
    ToolCommand,
    ToolResult,
    ToolStatus,
)
from streamagent.signing import verify
from streamagent.topics import RUN_EVENTS

LLM = replace(ONBOARDING, decider="llm")


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


@pytest.fixture
def llm_db(settings: Settings, model: FakeModel) -> Settings:
    db.migrate(settings, DECISION_SCHEMA)
    return model_settings(settings, model.url)


def test_the_cap_rule() -> None:
    caps = Caps(max_tokens=1000, max_cost_usd=0.01)
    assert caps.exceeded(Spending(600, 0.001), Spending(400, 0.001)) is None  # exactly at the cap: allowed
    over = caps.exceeded(Spending(600, 0.001), Spending(401, 0.001))
    assert over == (
        "token cap reached: the run spent 600 model tokens and the next call needs about 401 more,"
        " over max_tokens_per_run = 1000"
    )
    costly = caps.exceeded(Spending(10, 0.009), Spending(10, 0.002))
    assert costly is not None and costly.startswith("cost cap reached: the run spent $0.009000")
    assert "about $0.002000 more, over max_cost_usd_per_run = 0.01" in costly
    assert not Caps().active and Caps().exceeded(Spending(10**9, 10**6), Spending(1, 1)) is None
    # The workflow's caps win; where it sets none, the settings' apply.
    defaults = Settings(max_tokens_per_run=500, max_cost_usd_per_run=2.0)
    assert Caps.of(replace(LLM, max_tokens_per_run=9), defaults) == Caps(9, 2.0)
    assert Caps.of(LLM, Settings()) == Caps(0, 0.0)


def test_a_run_over_its_token_cap_escalates_without_a_call_and_one_under_proceeds(
    llm_db: Settings, model: FakeModel
) -> None:
    run = Run()
    first = decide(handler(llm_db, replace(LLM, max_tokens_per_run=100_000)), run)
    assert first.step == "enrich" and model.calls == 1
    spent = first.prompt_tokens + first.completion_tokens
    assert RunLedger(llm_db.database_url).spent(run.snap.run_id).spent.tokens == spent
    follow(run, first)

    tight = replace(LLM, max_tokens_per_run=spent + 10)  # what was spent fits; the next call does not
    h = handler(llm_db, tight)
    capped = decide(h, run)
    assert model.calls == 1  # the model was not asked
    assert capped.action is DecisionAction.escalate
    assert capped.reason.startswith(f"token cap reached: the run spent {spent} model tokens and the next call needs")
    assert capped.reason.endswith(f"over max_tokens_per_run = {spent + 10}")
    budget = capped.context["budget"]
    assert (
        budget["spent_tokens"] == spent
        and budget["estimate_tokens"] > 10
        and budget["max_tokens_per_run"] == spent + 10
    )
    assert capped.context["model_calls"] == 0 and (capped.prompt_tokens, capped.cost_usd) == (0, 0.0)
    ended = [codec.decode(v) for t, v in h.producer.sent if t == llm_db.topic(RUN_EVENTS)]  # type: ignore[attr-defined]
    assert any(isinstance(e, RunFailed) and e.status is FailureStatus.escalated for e in ended)

    roomy = llm(llm_db, replace(LLM, max_tokens_per_run=spent + 100_000)).decide(run.snap)
    assert roomy is not None and roomy.step == "jira" and model.calls == 2


def test_a_run_over_its_cost_cap_escalates_without_a_call(llm_db: Settings, model: FakeModel) -> None:
    run = Run()
    first = decide(handler(llm_db, LLM), run)
    assert first.cost_usd > 0
    follow(run, first)
    capped = llm(llm_db, replace(LLM, max_cost_usd_per_run=first.cost_usd + 1e-6)).decide(run.snap)
    assert capped is not None and capped.action is DecisionAction.escalate and model.calls == 1
    assert capped.reason.startswith(f"cost cap reached: the run spent ${first.cost_usd:.6f} on the model")
    roomy = llm(llm_db, replace(LLM, max_cost_usd_per_run=1.0)).decide(run.snap)
    assert roomy is not None and roomy.step == "jira" and model.calls == 2


def test_a_cap_below_the_first_call_asks_nothing(llm_db: Settings, model: FakeModel) -> None:
    decision = llm(llm_db, replace(LLM, max_tokens_per_run=50)).decide(Run().snap)
    assert decision is not None and decision.action is DecisionAction.escalate and model.calls == 0
    assert "the run spent 0 model tokens" in decision.reason


def test_the_planning_call_counts_against_the_cap(llm_db: Settings, model: FakeModel) -> None:
    # Room for the executor's call, not for a plan as well.
    bare = llm(llm_db, replace(LLM, max_tokens_per_run=100_000)).decide(Run(run_id="run-bare").snap)
    assert bare is not None and bare.step == "enrich" and "budget" not in bare.context
    planned = replace(LLM, planner=True, max_tokens_per_run=bare.prompt_tokens + 100)
    capped = llm(llm_db, planned).decide(Run(run_id="run-planned").snap)
    assert capped is not None and capped.action is DecisionAction.escalate and model.calls == 1
    assert capped.context["plan"]["plan"] is None  # never made: the cap came first


def test_the_repair_turn_is_checked_too(llm_db: Settings, model: FakeModel) -> None:
    probe = llm(llm_db, LLM).decide(Run(run_id="run-probe").snap)
    assert probe is not None
    one_call = probe.prompt_tokens + probe.completion_tokens
    model.script(Answer.call("crm_magic", {"x": 1}))  # refused: a repair turn would follow
    capped = llm(llm_db, replace(LLM, max_tokens_per_run=one_call + 50)).decide(Run(run_id="run-repair").snap)
    assert capped is not None and capped.action is DecisionAction.escalate
    assert model.calls == 2 and capped.context["model_calls"] == 1 and "unknown tool" in capped.context["refused"][0]
    assert capped.prompt_tokens > 0  # the refused answer was paid for, and is counted


def test_decisions_stored_before_the_columns_are_read_from_their_event(llm_db: Settings, model: FakeModel) -> None:
    run = Run()
    first = decide(handler(llm_db, LLM), run)
    with db.connect(llm_db) as conn:
        conn.execute("UPDATE decisions SET prompt_tokens = NULL, completion_tokens = NULL, cost_usd = NULL")
    spent = RunLedger(llm_db.database_url).spent(run.snap.run_id)
    assert spent.spent == Spending(first.prompt_tokens + first.completion_tokens, first.cost_usd)
    assert spent.last_version == 1


def test_workflow_caps_are_checked(tmp_path: Path) -> None:
    good = workflow_file(tmp_path, ONBOARDING.source, "max_tokens_per_run = 20000\nmax_cost_usd_per_run = 0.5\n")
    workflow = load_workflow(good)
    assert (workflow.max_tokens_per_run, workflow.max_cost_usd_per_run) == (20000, 0.5)
    for header, error in (
        ("max_tokens_per_run = 0\n", "max_tokens_per_run: must be a whole number > 0, not 0"),
        ("max_tokens_per_run = true\n", "max_tokens_per_run: must be a whole number > 0, not True"),
        ("max_tokens_per_run = 1.5\n", "max_tokens_per_run: must be a whole number > 0"),
        ('max_cost_usd_per_run = "1"\n', "max_cost_usd_per_run: must be a number of USD > 0, not '1'"),
        ("max_cost_usd_per_run = -1\n", "max_cost_usd_per_run: must be a number of USD > 0"),
    ):
        with pytest.raises(WorkflowError, match=error):
            load_workflow(workflow_file(tmp_path, ONBOARDING.source, header))


def _drafted(run: Run, record: DecisionRecorded, tokens: tuple[int, int], cost: float) -> None:
    """Fold ``record`` and its tool's result, which asked a model (a draft) for ``tokens`` and ``cost``."""
    run._apply(record)
    assert record.step is not None and record.tool is not None and record.command_id is not None
    run._apply(
        ToolResult(
            event_id=f"res-{record.step}",
            run_id=run.snap.run_id,
            occurred_at=run.clock,
            command_id=record.command_id,
            tool=record.tool,
            step=record.step,
            status=ToolStatus.succeeded,
            output=output_of(record.step, record.arguments),
            model="fake-writer",
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            cost_usd=cost,
        )
    )


def test_the_token_cap_counts_what_the_runs_tools_spent_on_models(llm_db: Settings, model: FakeModel) -> None:
    run = Run()
    first = decide(handler(llm_db, replace(LLM, max_tokens_per_run=100_000)), run)
    decided = first.prompt_tokens + first.completion_tokens
    _drafted(run, first, (700, 300), 0.002)  # the step's tool asked a model for 1000 tokens
    assert (run.snap.tool_tokens, run.snap.tokens) == (1000, decided + 1000)
    probe = llm(llm_db, replace(LLM, max_tokens_per_run=1)).decide(run.snap)
    assert probe is not None and model.calls == 1
    budget = probe.context["budget"]
    # The ledger's decisions plus the tool's tokens, each once.
    assert (budget["spent_tokens"], budget["tool_tokens"]) == (decided + 1000, 1000)
    estimate = budget["estimate_tokens"]

    cap = decided + estimate + 500  # room for the next call on the decisions alone, not with the tool's 1000
    capped = llm(llm_db, replace(LLM, max_tokens_per_run=cap)).decide(run.snap)
    assert capped is not None and capped.action is DecisionAction.escalate and model.calls == 1  # not asked
    assert capped.reason == (
        f"token cap reached: the run spent {decided + 1000} model tokens and the next call needs about"
        f" {estimate} more, over max_tokens_per_run = {cap}"
    )
    # The same run had its tool spent nothing: the call fits, and the model is asked.
    unspent = run.snap.model_copy(update={"tool_tokens": 0, "tool_cost_usd": 0.0, "tokens": decided})
    asked = llm(llm_db, replace(LLM, max_tokens_per_run=cap)).decide(unspent)
    assert asked is not None and asked.action is DecisionAction.dispatch and model.calls == 2


def test_the_cost_cap_counts_what_the_runs_tools_spent_on_models(llm_db: Settings, model: FakeModel) -> None:
    run = Run()
    first = decide(handler(llm_db, LLM), run)
    _drafted(run, first, (10, 10), 0.5)
    capped = llm(llm_db, replace(LLM, max_cost_usd_per_run=0.5)).decide(run.snap)
    assert capped is not None and capped.action is DecisionAction.escalate and model.calls == 1
    assert capped.reason.startswith(f"cost cap reached: the run spent ${first.cost_usd + 0.5:.6f} on the model")


def test_a_command_carries_what_the_runs_cap_leaves_signed(llm_db: Settings, model: FakeModel) -> None:
    run = Run()
    h = handler(llm_db, replace(LLM, max_tokens_per_run=100_000, max_cost_usd_per_run=1.0))
    first = decide(h, run)
    commands = [codec.decode(v) for _t, v in h.producer.sent]  # type: ignore[attr-defined]
    (command,) = [c for c in commands if isinstance(c, ToolCommand)]
    # What is left after this decision's own call (not folded yet: counted as the guard counts it).
    assert command.budget_tokens == 100_000 - first.prompt_tokens - first.completion_tokens
    assert command.budget_cost_usd == pytest.approx(1.0 - first.cost_usd)
    keys = tool_keys(h.keys, command.tool)
    assert verify(command, keys) is None
    assert verify(command.model_copy(update={"budget_tokens": 10**9}), keys) is not None

    # A workflow with no cap (and no policy budget) sends none: the tool has no limit.
    run = Run(run_id="run-uncapped")
    h = handler(llm_db, LLM)
    decide(h, run)
    (free,) = [c for _t, v in h.producer.sent if isinstance(c := codec.decode(v), ToolCommand)]  # type: ignore[attr-defined]
    assert (free.budget_tokens, free.budget_cost_usd) == (None, None)
