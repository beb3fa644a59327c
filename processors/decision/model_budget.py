"""What a run may still spend on models, written on each command it sends: a tool that asks a model
checks its own call against it before making it, as the model decider checks its calls. Pure.

Two limits bound a run's model spending: its workflow's per-run caps (``max_tokens_per_run``,
``max_cost_usd_per_run``, or the settings' defaults; 0: none) and its policy's budgets (``max_tokens``,
``max_cost_usd``; none set: none). What is left is the least of them minus what the run has spent:
every decision folded and every tool's model calls (the snapshot's ``tokens``), plus the decision being
made now, not folded yet (as the guard counts it). A fan-out's commands are each told the same figure:
together they may spend more than it, which the guard then stops at the next decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamagent.processors.decision.decider import Decision
from streamagent.processors.decision.llm.budget import Caps

from streamagent.events import StateSnapshot
from streamagent.policy import Budgets


@dataclass(frozen=True)
class Left:
    """None: no cap."""

    tokens: int | None = None
    cost_usd: float | None = None


def left(snap: StateSnapshot, decision: Decision, caps: Caps, budgets: Budgets) -> Left:
    tokens = [t for t in (caps.max_tokens or None, budgets.max_tokens) if t is not None]
    costs = [c for c in (caps.max_cost_usd or None, budgets.max_cost_usd) if c is not None]
    spent_tokens = snap.tokens + decision.prompt_tokens + decision.completion_tokens
    spent_cost = snap.cost_usd + decision.cost_usd
    return Left(
        max(0, min(tokens) - spent_tokens) if tokens else None,
        round(max(0.0, min(costs) - spent_cost), 6) if costs else None,
    )
