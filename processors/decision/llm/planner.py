"""The planner: a (stronger) model that writes a short plan when a run starts; the executor follows it.

Made at most once per run: the plan (or the planner's failure) is stored in ``run_plans`` before any
decision uses it, and every later decision, a redelivered snapshot, a restart or another instance reads
it there instead of asking again. A planner that is down, times out or answers no usable text does
not stop the run: the failure is stored as the run's plan-that-is-not, and the executor is told it
decides without one. A plan longer than ``plan_max_chars`` is cut with a marker before it is stored,
so every decision's context is bounded whatever the planner wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from streamagent.processors.decision.llm.budget import Spending
from streamagent.processors.decision.llm.client import Completion, ModelClient, ModelUnavailable
from streamagent.processors.decision.llm.context import (
    OfferedTool,
    bound_plan,
    estimate_tokens,
    message_tokens,
    planner_messages,
)
from streamagent.processors.decision.llm.ledger import PlanRecord, RunLedger
from streamagent.processors.workflow import Workflow

from streamagent.config import Settings
from streamagent.events import StateSnapshot
from streamagent.pricing import Prices, cost_usd

log = logging.getLogger(__name__)

# The label of the planner's calls in streamagent_model_calls_total: apart from the executor's, whose
# calls must match its decisions one for one.
PLANNER = "llm-planner"


class Planner:
    def __init__(
        self, settings: Settings, ledger: RunLedger, prices: Prices, *, client: ModelClient | None = None
    ) -> None:
        self.ledger = ledger
        self.prices = prices
        self.max_chars = settings.plan_max_chars
        self.client = client or ModelClient(settings, decider=PLANNER, role="planner")

    def messages(
        self, snapshot: StateSnapshot, workflow: Workflow, offered: Sequence[OfferedTool]
    ) -> list[dict[str, Any]]:
        return planner_messages(snapshot, workflow, offered, max_chars=self.max_chars)

    def estimate(self, messages: Sequence[dict[str, Any]]) -> Spending:
        """What planning will cost at most, roughly: its prompt and a plan of the longest kept length."""
        prompt, completion = message_tokens(messages), estimate_tokens("x" * self.max_chars)
        return Spending(prompt + completion, cost_usd(self.prices, self.client.model, prompt, completion))

    def make(self, snapshot: StateSnapshot, messages: list[dict[str, Any]]) -> PlanRecord:
        """Ask the planner once and store what came of it; returns the run's stored plan (ours, or one
        another instance stored first)."""
        plan: str | None = None
        error: str | None = None
        completion: Completion | None = None
        try:
            completion = self.client.text(messages)
        except ModelUnavailable as exc:
            error = f"the planner is unavailable: {exc.reason}"
        except Exception as exc:  # an answer the client cannot read: a planner failure, not the run's
            error = f"the planner failed: {exc!r}"
        else:
            text = str(completion.raw.get("content") or "").strip()
            if text:
                plan = bound_plan(text, self.max_chars)
            else:
                error = "the planner answered no plan (no text)"
        if error is not None:
            log.warning("run goes on without a plan: %s", error, extra={"run_id": snapshot.run_id})
        prompt = completion_tokens = 0
        estimated = False
        if completion is not None:
            if completion.prompt_tokens is None or completion.completion_tokens is None:
                estimated = True  # no usage reported: counted with the context builder's rule, and said so
                prompt, completion_tokens = message_tokens(messages), estimate_tokens(str(completion.raw))
            else:
                prompt, completion_tokens = completion.prompt_tokens, completion.completion_tokens
        record = PlanRecord(
            run_id=snapshot.run_id,
            based_on_version=snapshot.version,
            plan=plan,
            error=error,
            model=self.client.model,
            prompt_tokens=prompt,
            completion_tokens=completion_tokens,
            cost_usd=cost_usd(self.prices, self.client.model, prompt, completion_tokens),
            audit={
                "messages": messages,
                "answer": completion.raw if completion is not None else None,
                "http_attempts": completion.attempts if completion is not None else None,
                "latency_ms": round(completion.latency_s * 1000) if completion is not None else None,
                "tokens_estimated": estimated,
            },
        )
        return self.ledger.save_plan(record)
