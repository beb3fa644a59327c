"""The fold counts what a model-backed tool spent (ToolResult v2's tokens and cost) in the run's spending,
the figures the guard's budgets read, once per result however often it is delivered."""

from __future__ import annotations

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
