"""What a run may still spend on models, as its commands carry it: the least of what its workflow's
per-run caps and its policy's budgets leave, after every decision and tool call so far and the decision
being made."""

from __future__ import annotations

from streamagent.processors.decision.decider import Decision
from streamagent.processors.decision.llm.budget import Caps
from streamagent.processors.decision.model_budget import Left, left
from test_fold import dispatch, fold, requested

from streamagent.events import DecisionAction
from streamagent.policy import Budgets

SNAP = fold([requested()]).snapshot.model_copy(update={"tokens": 700, "cost_usd": 0.007, "tool_tokens": 400})
NEXT = Decision(DecisionAction.dispatch, "draft is next", step="draft", tool="draft")


def test_no_cap_and_no_budget_leave_no_limit() -> None:
    assert left(SNAP, NEXT, Caps(), Budgets()) == Left(None, None)


def test_the_least_of_the_cap_and_the_budget_minus_what_the_run_spent() -> None:
    assert left(SNAP, NEXT, Caps(max_tokens=1000), Budgets()) == Left(300, None)
    assert left(SNAP, NEXT, Caps(max_tokens=1000), Budgets(max_tokens=900)) == Left(200, None)
    assert left(SNAP, NEXT, Caps(max_tokens=800), Budgets(max_tokens=5000)) == Left(100, None)
    assert left(SNAP, NEXT, Caps(max_cost_usd=0.01), Budgets(max_cost_usd=0.5)) == Left(None, 0.003)


def test_the_decision_being_made_counts_and_nothing_is_below_zero() -> None:
    costly = Decision(DecisionAction.dispatch, "x", step="draft", tool="draft", prompt_tokens=250, completion_tokens=40)
    assert left(SNAP, costly, Caps(max_tokens=1000), Budgets()) == Left(10, None)
    assert left(SNAP, costly, Caps(max_tokens=500), Budgets(max_cost_usd=0.001)) == Left(0, 0.0)


def test_a_folded_decision_is_counted_by_the_snapshot() -> None:
    decided = dispatch("enrich").model_copy(update={"prompt_tokens": 90, "completion_tokens": 10})
    snap = fold([requested(), decided]).snapshot
    assert left(snap, NEXT, Caps(max_tokens=150), Budgets()) == Left(50, None)
