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
from dataclasses import dataclass, replace
from datetime import datetime

from streamagent.processors.decision.arguments import ArgumentCheck, catalogue_check
from streamagent.processors.decision.choice import EntryOf
from streamagent.processors.decision.decider import Decider, Decision, context_of
from streamagent.processors.guard.judge import Verdict
from streamagent.processors.guard.stage import GuardStage
from streamagent.processors.workflow import ToolAvailability

from streamagent.events import DecisionAction, RunStatus, StateSnapshot, is_child_tool


@dataclass(frozen=True)
class CatalogueInputs:
    """Everything the decision layer asks of the catalogue, all answered from one ``entry_of``."""

    entry_of: EntryOf  # the tool's entry while it has a live member, else None
    available: ToolAvailability  # the decider: dispatch, or wait for the tool
    check: ArgumentCheck  # the decider: do the arguments fit the announced input schema
    declared_approval: Callable[[str], bool]  # the guard: the tool says every call needs a person


def catalogue_inputs(entry_of: EntryOf) -> CatalogueInputs:
    def available(name: str) -> bool:
        # A child workflow's step starts a run, not a tool: nothing in the catalogue to wait for.
        return is_child_tool(name) or entry_of(name) is not None

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
    proposal = cancelled(snap) or decider.decide(snap)
    if proposal is None:
        return None, None
    if not proposal.parallel:
        return proposal, guard.judge(snap, proposal, at)
    return proposal, judge_fan_out(guard, snap, proposal, at)


def cancelled(snap: StateSnapshot) -> Decision | None:
    """An operator cancelled the running run (``streamagent cancel``): it fails with who and why, whatever
    its decider would do (the model is not asked); its live children are ended with it by the processor."""
    if snap.status is not RunStatus.running or snap.cancelled is None:
        return None
    return Decision(DecisionAction.fail, snap.cancelled, context=context_of(snap, []))


def judge_fan_out(guard: GuardStage, snap: StateSnapshot, proposal: Decision, at: datetime | None) -> Verdict:
    """Each step of a fan-out judged on its own, as if dispatched one after the other (a budget of tool
    calls counts each). The steps the guard lets through are dispatched together; a step it holds for
    approval, or refuses, is left out and proposed again on its own by a later decision (so an
    approval-gated step waits alone while the others run). None let through: the first one's verdict."""
    verdicts: list[Verdict] = []
    counted = snap
    for index, step in enumerate(proposal.dispatches()):
        # The model's spending is the decision's, judged once, with its first step.
        one = replace(step, parallel=()) if index == 0 else replace(step, context=proposal.context)
        verdict = guard.judge(counted, one, at)
        verdicts.append(verdict)
        if verdict.decision.action is DecisionAction.dispatch:
            counted = counted.model_copy(update={"tool_calls": counted.tool_calls + 1})
    passed = [v for v in verdicts if v.decision.action is DecisionAction.dispatch]
    if not passed:
        return verdicts[0]
    lead, *rest = passed
    left_out = [v.decision.step for v in verdicts if v not in passed]
    reason = proposal.reason + (f"; {', '.join(s or '' for s in left_out)} left for later" if left_out else "")
    decision = replace(
        lead.decision,
        reason=reason,
        context=proposal.context,
        prompt_tokens=proposal.prompt_tokens,
        completion_tokens=proposal.completion_tokens,
        cost_usd=proposal.cost_usd,
        decider=proposal.decider,
        parallel=tuple(v.decision for v in rest),
    )
    return replace(lead, decision=decision, parallel=tuple(rest))
