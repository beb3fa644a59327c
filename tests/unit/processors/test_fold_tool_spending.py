"""The fold counts what a model-backed tool spent (ToolResult v2's tokens and cost) in the run's spending,
the figures the guard's budgets read, once per result however often it is delivered."""

from __future__ import annotations

import pytest
from streamagent.processors.state.fold import apply
from test_fold import DEFAULT_DEADLINE_S, dispatch, fold, requested, result

from streamagent.events import ToolResult


def _drafted(**update: object) -> ToolResult:
    base = result("enrich", output={"industry": "robotics"})
    return base.model_copy(
        update={
            "model": "m",
            "prompt_tokens": 300,
            "completion_tokens": 120,
            "cost_usd": 0.0021,
            "model_context": {"messages": [{"role": "user", "content": "x"}], "answer": "{}"},
            **update,
        }
    )


def test_a_tool_results_model_tokens_and_cost_join_the_runs_spending() -> None:
    state = fold([requested(), dispatch("enrich"), _drafted()])
    assert state.snapshot.tokens == 420 and state.snapshot.cost_usd == 0.0021


def test_a_result_delivered_again_under_a_new_event_id_is_counted_once() -> None:
    first = _drafted()
    state = fold([requested(), dispatch("enrich"), first, first.model_copy(update={"event_id": "again"})])
    assert state.snapshot.tokens == 420 and state.snapshot.cost_usd == 0.0021


def test_a_result_that_spent_nothing_leaves_the_spending_alone() -> None:
    state = fold([requested(), dispatch("enrich")])
    after = apply(state, result("enrich"), DEFAULT_DEADLINE_S).state
    assert (after.snapshot.tokens, after.snapshot.cost_usd) == (state.snapshot.tokens, state.snapshot.cost_usd)


def test_a_failed_tool_call_that_asked_the_model_still_counts() -> None:
    failed = _drafted(status="failed", error="boom", error_kind="permanent", output={})
    state = fold([requested(), dispatch("enrich"), failed])
    assert state.snapshot.tokens == 420


def test_the_tools_part_of_the_spending_is_kept_apart_from_the_decisions() -> None:
    # The model decider's caps add ``tool_tokens`` to its ledger of decisions: a decision's own tokens
    # must not be in it, or they would count twice.
    decided = dispatch("enrich").model_copy(update={"prompt_tokens": 1000, "completion_tokens": 50, "cost_usd": 0.01})
    state = fold([requested(), decided, _drafted()])
    snap = state.snapshot
    assert (snap.tokens, snap.cost_usd) == (1000 + 50 + 420, pytest.approx(0.0121))
    assert (snap.tool_tokens, snap.tool_cost_usd) == (420, 0.0021)
    again = apply(state, _drafted(event_id="again"), DEFAULT_DEADLINE_S).state.snapshot
    assert (again.tool_tokens, again.tool_cost_usd) == (420, 0.0021)  # counted once


def test_a_decision_alone_leaves_the_tools_part_at_zero() -> None:
    decided = dispatch("enrich").model_copy(update={"prompt_tokens": 1000, "completion_tokens": 50})
    snap = fold([requested(), decided, result("enrich")]).snapshot
    assert snap.tokens == 1050 and (snap.tool_tokens, snap.tool_cost_usd) == (0, 0.0)
