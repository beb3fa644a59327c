"""The per-run spending caps of model-decided runs: whether the next call may be made. Pure.

A run may spend at most ``max_tokens_per_run`` model tokens (prompt + completion, summed over its
recorded decisions, its plan included, and over the model calls of its tools) and
``max_cost_usd_per_run`` dollars. Before a model call the
decider adds what the run spent to an estimate of the call (its prompt, counted with the context
builder's rule); over a cap, the call is not made and the run escalates with a reason naming the cap,
what was spent and the estimate. Checked before the call rather than after: a cap is a promise that
the money is not spent, not a report that it was. A model-backed tool is told what the caps leave on its
command (``ToolCommand.budget_tokens``) and checks its own call the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamagent.processors.workflow import Workflow

from streamagent.config import Settings


@dataclass(frozen=True)
class Spending:
    tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Spending) -> Spending:
        return Spending(self.tokens + other.tokens, round(self.cost_usd + other.cost_usd, 6))


@dataclass(frozen=True)
class Caps:
    """0: no cap."""

    max_tokens: int = 0
    max_cost_usd: float = 0.0

    @classmethod
    def of(cls, workflow: Workflow, settings: Settings) -> Caps:
        """The workflow's caps; where it sets none, the settings' defaults."""
        tokens = workflow.max_tokens_per_run if workflow.max_tokens_per_run is not None else settings.max_tokens_per_run
        cost = workflow.max_cost_usd_per_run
        return cls(tokens, cost if cost is not None else settings.max_cost_usd_per_run)

    @property
    def active(self) -> bool:
        return self.max_tokens > 0 or self.max_cost_usd > 0

    def exceeded(self, spent: Spending, estimate: Spending) -> str | None:
        """Why the next call would break a cap, or None when it may be made."""
        if self.max_tokens and spent.tokens + estimate.tokens > self.max_tokens:
            return (
                f"token cap reached: the run spent {spent.tokens} model tokens and the next call needs about"
                f" {estimate.tokens} more, over max_tokens_per_run = {self.max_tokens}"
            )
        if self.max_cost_usd and spent.cost_usd + estimate.cost_usd > self.max_cost_usd:
            return (
                f"cost cap reached: the run spent ${spent.cost_usd:.6f} on the model and the next call costs about"
                f" ${estimate.cost_usd:.6f} more, over max_cost_usd_per_run = {self.max_cost_usd:g}"
            )
        return None
