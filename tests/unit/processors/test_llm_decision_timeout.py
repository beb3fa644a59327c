"""A slow model against the decision's whole time limit (STREAMAGENT_MODEL_DECISION_TIMEOUT_S).

Each call has its HTTP timeout and its retries; the decision as a whole (every attempt, every pause,
the repair turn) has one limit, past which the workflow's fallback decides. The fake model delays its
answers for real and the real openai client waits for them over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from llm_runs import DOMAIN, Run, entries
from streamagent.processors.decision.arguments import catalogue_check
from streamagent.processors.decision.llm.decider import LlmDecider
from streamagent.processors.workflow import ONBOARDING
from streamagent.tools.sandbox.model import Answer, FakeModel

from streamagent.config import Settings, settings_from
from streamagent.events import DecisionAction

ENTRIES = entries()


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


def settings(url: str, **env: str) -> Settings:
    return settings_from(
        {
            "STREAMAGENT_DECIDER": "llm",
            "OPENAI_BASE_URL": url,
            "STREAMAGENT_MODEL": "test-model",
            **env,
        }
    )


def decide(chosen: Settings) -> tuple[object, float]:
    llm = LlmDecider(chosen, {ONBOARDING.name: ONBOARDING}, lambda _t: True, catalogue_check(ENTRIES.get), ENTRIES.get)
    started = time.monotonic()
    decision = llm.decide(Run().snap)
    return decision, time.monotonic() - started


def test_retries_stop_at_the_decisions_time_limit_and_the_fallback_decides(model: FakeModel) -> None:
    # Each attempt times out at 0.6 s; with 5 retries and their backoff that alone would take ~19 s.
    model.script(*[Answer.slow(3.0) for _ in range(6)])
    chosen = settings(
        model.url,
        STREAMAGENT_MODEL_TIMEOUT_S="0.6",
        STREAMAGENT_MODEL_MAX_RETRIES="5",
        STREAMAGENT_MODEL_DECISION_TIMEOUT_S="1.5",
    )
    assert chosen.model_decision_timeout_s == 1.5
    decision, elapsed = decide(chosen)
    assert decision is not None
    assert (decision.action, decision.step) == (DecisionAction.dispatch, "enrich")
    assert decision.arguments == {"domain": DOMAIN}
    assert decision.reason.startswith("fallback to rules (model unavailable: no answer within the decision's time")
    assert decision.context["fallback"] == "rules"
    # The first attempt timed out whole (0.6 s), the pause (0.5 s) fitted, the second got what was left.
    assert model.calls == 2
    assert 1.4 <= elapsed < 3.0, f"decided after {elapsed:.2f}s with a 1.5 s limit"


def test_the_repair_turn_counts_in_the_time_limit(model: FakeModel) -> None:
    # A malformed answer after 0.8 s; the repair turn's answer would come 3 s later (and be valid).
    model.script(Answer.slow(0.8, Answer.call("enrich", '{"domain": ')), Answer.slow(3.0))
    chosen = settings(
        model.url,
        STREAMAGENT_MODEL_TIMEOUT_S="10",
        STREAMAGENT_MODEL_MAX_RETRIES="0",
        STREAMAGENT_MODEL_DECISION_TIMEOUT_S="1.5",
    )
    decision, elapsed = decide(chosen)
    assert decision is not None and decision.action is DecisionAction.dispatch and decision.step == "enrich"
    assert model.calls == 2
    assert "not valid JSON" in decision.context["refused"][0]
    assert "time limit" in decision.context["fallback_reason"]
    assert decision.context["model_calls"] == 1  # the repair turn got no answer
    assert 1.4 <= elapsed < 3.0, f"decided after {elapsed:.2f}s with a 1.5 s limit"


def test_no_pause_is_taken_that_would_end_past_the_limit(model: FakeModel) -> None:
    # The endpoint asks for 2 s before the next try; the decision has 1 s in all: no wait, the fallback now.
    model.script(Answer.error(503, retry_after=2.0), Answer())
    chosen = settings(model.url, STREAMAGENT_MODEL_MAX_RETRIES="3", STREAMAGENT_MODEL_DECISION_TIMEOUT_S="1")
    decision, elapsed = decide(chosen)
    assert decision is not None and decision.step == "enrich"
    assert decision.context["fallback"] == "rules"
    assert "no time left in the decision to retry" in decision.context["fallback_reason"]
    assert "HTTP 503" in decision.context["fallback_reason"]
    assert model.calls == 1
    assert elapsed < 0.9
