"""What ``make demo-llm`` prints per recorded decision: latency, tokens, refusals, fallback."""

from __future__ import annotations

from streamagent.console.demo_llm import describe, summary
from streamagent.events import DecisionAction, DecisionRecorded


def decision(version: int, **context: object) -> DecisionRecorded:
    return DecisionRecorded(
        event_id=f"d{version}",
        run_id="r1",
        decision_id=f"d{version}",
        based_on_version=version,
        action=DecisionAction.dispatch,
        step="jira",
        tool="jira",
        reason="next step",
        decider="llm",
        context=context,
        prompt_tokens=500 if context else 0,
        completion_tokens=40 if context else 0,
    )


def test_a_repaired_then_fallen_back_decision_shows_each_refusal_and_the_fallback() -> None:
    d = decision(
        3,
        messages=[{"role": "system", "content": "…"}],
        latency_ms=812.4,
        model_calls=2,
        refused=["the answer is not valid JSON", "unknown tool 'rm'"],
        fallback="rules",
        fallback_reason="answer refused twice: unknown tool 'rm'",
        tokens_estimated=True,
    )
    lines = describe(d)
    assert lines[0].split()[:3] == ["v3", "dispatch", "jira"]
    assert "812 ms" in lines[0] and "500+40 tokens (estimated)" in lines[0] and "2 calls" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["refused", "refused", "fallback rules took over"]
    assert "unknown tool 'rm'" in lines[-1]


def test_a_decision_made_by_code_says_no_model_was_called() -> None:
    (line,) = describe(decision(5))
    assert "by code, no model call" in line


def test_the_summary_counts_calls_refusals_and_fallbacks() -> None:
    by_model = decision(1, messages=[{}], latency_ms=1500, model_calls=2, refused=["x"], fallback="rules")
    text = summary([by_model, decision(2)])
    assert "2 decisions, 1 by the model (2 calls, 1.5 s)" in text
    assert "500+40 tokens, 1 answer(s) refused, 1 fallback(s)" in text
