"""``streamagent replay``: rebuild derived state from the log beside the live one, verify it, apply it;
and re-decide recorded snapshots with a candidate decider, side effects off."""

from .decisions import Candidate, DecisionReport, candidate, candidate_decider, replay_decisions
from .rebuild import Rebuilt, Scope, rebuild
from .verify import Report, verify

__all__ = [
    "Candidate",
    "DecisionReport",
    "Rebuilt",
    "Report",
    "Scope",
    "candidate",
    "candidate_decider",
    "rebuild",
    "replay_decisions",
    "verify",
]
