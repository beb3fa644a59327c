"""What every decider returns, and the context it is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from streamagent.events import DecisionAction, StateSnapshot


@dataclass(frozen=True)
class Decision:
    action: DecisionAction
    reason: str
    step: str | None = None
    tool: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    # Which decider made it, when a decider routes runs to others (per workflow); None: the processor's.
    decider: str | None = None
    # The shared memory it read: entity reference -> version (0: memory had none).
    memory: dict[str, int] = field(default_factory=dict)
    # A fan-out: further dispatches (each its step, tool, arguments and memory) made by the same decision.
    parallel: tuple[Decision, ...] = ()

    def dispatches(self) -> tuple[Decision, ...]:
        """Every step this decision dispatches, itself first (none unless it is a dispatch)."""
        return (self, *self.parallel) if self.action is DecisionAction.dispatch else ()


class Decider(Protocol):
    name: str

    def decide(self, snapshot: StateSnapshot) -> Decision | None:
        """The next action for this snapshot, or None to wait for the next event."""
        ...


def context_of(snapshot: StateSnapshot, tools: list[str]) -> dict[str, Any]:
    """The prepared context a decider sees; recorded with every decision for the audit trail."""
    return {
        "run_id": snapshot.run_id,
        "version": snapshot.version,
        "status": snapshot.status.value,
        "request": snapshot.request.model_dump(),
        "steps": {s.name: s.status.value for s in snapshot.steps},
        "results": snapshot.results(),
        "errors": {s.name: s.error for s in snapshot.steps if s.error},
        "deadline_at": snapshot.deadline_at.isoformat(),
        "deadline_exceeded": snapshot.deadline_exceeded,
        "available_tools": tools,
    }
