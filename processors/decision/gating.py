"""What stands around the decider: the catalogue it reads, and the guard that judges what it proposes.

Two places decide: the live decision processor, and ``streamagent replay decisions``, which re-decides
recorded snapshots. They must gate a decision the same way, or a replay of an unchanged setup reports
differences that are only the replay's: "waiting for tool X" comes from the decider reading the
catalogue, "held for approval" (and budgets, denials, expiries) from the guard reading the policy and
the run's approvals in its snapshot. So both take the catalogue through ``catalogue_inputs`` and
decide through ``decide``; only where the catalogue comes from differs (the live registry, or the
registry as it was at the recorded decision).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from streamagent.processors.decision.arguments import ArgumentCheck, catalogue_check
from streamagent.processors.decision.choice import EntryOf
from streamagent.processors.decision.decider import Decider, Decision
from streamagent.processors.guard.judge import Verdict
from streamagent.processors.guard.stage import GuardStage
from streamagent.processors.workflow import ToolAvailability

from streamagent.events import StateSnapshot


@dataclass(frozen=True)
class CatalogueInputs:
    """Everything the decision layer asks of the catalogue, all answered from one ``entry_of``."""

    entry_of: EntryOf  # the tool's entry while it has a live member, else None
    available: ToolAvailability  # the decider: dispatch, or wait for the tool
    check: ArgumentCheck  # the decider: do the arguments fit the announced input schema
    declared_approval: Callable[[str], bool]  # the guard: the tool says every call needs a person


def catalogue_inputs(entry_of: EntryOf) -> CatalogueInputs:
    def available(name: str) -> bool:
        return entry_of(name) is not None

    def declared_approval(name: str) -> bool:
        entry = entry_of(name)
        return entry is not None and entry.requires_approval

    return CatalogueInputs(entry_of, available, catalogue_check(entry_of), declared_approval)


def decide(
    decider: Decider, guard: GuardStage, snap: StateSnapshot, at: datetime | None = None
) -> tuple[Decision | None, Verdict | None]:
    """The decider's proposal for ``snap`` (None: it waits for the next event), and the guard's verdict
    on it at ``at`` (default: now). ``Verdict.decision`` is what is recorded: the proposal, or the
    wait for approval or the escalation that replaces it."""
    proposal = decider.decide(snap)
    return proposal, guard.judge(snap, proposal, at) if proposal is not None else None
