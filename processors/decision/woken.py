"""The state a run waiting for a tool has when the tool appears: the snapshot it waited on, moved past
the recorded wait.

The state processor publishes no snapshot for a recorded wait (nothing changed but the wait itself),
so the decision processor derives it when it wakes the run, and ``replay decisions`` derives the same
one to re-decide that woken decision: it is on no topic.
"""

from __future__ import annotations

from streamagent.events import DecisionRecorded, StateSnapshot


def after_wait(waited: StateSnapshot, wait: DecisionRecorded) -> StateSnapshot:
    """``waited`` (version v) as folding ``wait`` (its decision) makes it: version v+1, the wait as its
    last event and decision, the wait's reason shown, and what the wait spent added (see
    processors/state/fold.py)."""
    return waited.model_copy(
        update={
            "version": waited.version + 1,
            "last_event_id": wait.event_id,
            "last_decision_id": wait.decision_id,
            "reason": wait.reason,
            "redrive_command_id": None,
            "decisions": waited.decisions + 1,
            "tokens": waited.tokens + wait.prompt_tokens + wait.completion_tokens,
            "cost_usd": waited.cost_usd + wait.cost_usd,
        }
    )
