"""The context builder is pure, and keeps to its token budget by its stated rule."""

from __future__ import annotations

from llm_runs import DOMAIN, Run, entries
from streamagent.processors.decision.llm.context import (
    REMAINING_MARKER,
    OfferedTool,
    build_messages,
    message_tokens,
)
from streamagent.processors.workflow import ONBOARDING

OFFERED = [OfferedTool(e.name, e.description, e.input_schema) for e in entries().values() if e.name != "crm"]


def _run_with_results(enrich_extra: int, jira_extra: int) -> Run:
    run = Run()
    run.dispatch("enrich", {"domain": DOMAIN})
    run.result("enrich", {"industry": "robotics", "employees": 120, "notes": "e" * enrich_extra})
    run.dispatch("jira", {"key": "ACME1"})
    run.result("jira", {"id": "10001", "key": "ACME1", "log": "j" * jira_extra})
    return run


def test_same_snapshot_same_messages() -> None:
    run = _run_with_results(100, 100)
    first = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=6000)
    again = build_messages(run.snap, ONBOARDING, list(OFFERED), budget_tokens=6000)
    assert first == again
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert first.truncated == {}
    assert first.estimated_tokens == message_tokens(first.messages)


def test_within_budget_nothing_is_cut() -> None:
    run = _run_with_results(2000, 1000)
    prepared = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=6000)
    assert "…[truncated" not in prepared.messages[1]["content"]
    assert "e" * 2000 in prepared.messages[1]["content"]


def test_over_budget_the_largest_result_is_cut_first() -> None:
    run = _run_with_results(8000, 1500)
    untrimmed = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=100_000)
    budget = untrimmed.estimated_tokens - 1000  # needs 4000 characters less: all from the larger one
    prepared = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=budget)
    assert prepared.estimated_tokens <= budget
    assert set(prepared.truncated) == {"enrich"}
    user = prepared.messages[1]["content"]
    assert "j" * 1500 in user  # the smaller result is whole
    assert f"…[truncated {prepared.truncated['enrich']} chars]" in user


def test_deep_cuts_bring_the_largest_down_to_the_others_then_both() -> None:
    run = _run_with_results(8000, 3000)
    untrimmed = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=100_000)
    budget = untrimmed.estimated_tokens - 2500  # 10 000 characters less: more than the gap between them
    prepared = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=budget)
    assert prepared.estimated_tokens <= budget
    assert set(prepared.truncated) == {"enrich", "jira"}
    assert prepared.truncated["enrich"] > prepared.truncated["jira"]


def test_the_goal_and_the_remaining_steps_are_never_dropped() -> None:
    run = _run_with_results(20_000, 20_000)
    prepared = build_messages(run.snap, ONBOARDING, OFFERED, budget_tokens=500)  # impossible to meet
    system, user = (m["content"] for m in prepared.messages)
    assert ONBOARDING.goal in system and "escalate" in system
    assert REMAINING_MARKER in user and '"step": "email"' in user and '"step": "slack"' in user
    assert '"ready": true' in user and "Welcome to streamagent, Acme Robotics" in user  # email's prepared arguments
    assert "Acme Robotics" in user and DOMAIN in user  # the request
    # Both results went down to the floor, each with its marker; the rest could not be cut.
    assert set(prepared.truncated) == {"enrich", "jira"}
    assert user.count("…[truncated") == 2
    assert prepared.estimated_tokens > 500
