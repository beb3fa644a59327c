"""The guard's verdict on one proposed decision. Pure: policy, state and clock in, verdict out.

Where the guard runs, and why: a separate step inside the decision processor's batch, after the
decider and before the decision is stored (processors/decision/processor.py). A guard of its own
(a consumer group between a "proposed" topic and the tool topics) would add a hop and a second
durable record per step, and a window in which a proposal exists that policy has not judged; here
the decision and its verdict are one row and one event, stored before anything is produced, so a
command cannot reach a tool topic unjudged, and one decision per state version still holds (a
redelivered snapshot re-emits the recorded verdict, never judges again under a newer policy).

What is judged:
- a dispatch: the run's budgets (tool calls, decisions, model tokens and cost, wall time), then
  whether policy or the tool itself asks for a person's approval;
- a wait (a model that waits forever is a loop too): the decisions and wall-time budgets;
- an undo (compensate) is always allowed and recorded as such; the run's end is not judged.

A refusal replaces the proposal with an escalation naming the budget; the proposal stays in the
decision's context (``proposed``) for the audit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from streamagent.processors.decision.decider import Decision

from streamagent.approval import arguments_digest
from streamagent.events import ApprovalStatus, DecisionAction, StateSnapshot, stable_id
from streamagent.policy import Budgets, Policy

ALLOWED = "allowed"
APPROVAL = "approval"
REFUSED = "refused"


@dataclass(frozen=True)
class ApprovalAsk:
    """A new approval request the decision emits (``ApprovalRequested``)."""

    request_id: str
    step: str
    tool: str
    arguments: dict[str, Any]
    digest: str
    reason: str
    requested_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Verdict:
    decision: Decision  # what is recorded: the proposal, or the wait/escalation that replaces it
    outcome: str | None  # allowed | approval | refused; None: nothing to judge
    reason: str | None
    policy_version: str
    ask: ApprovalAsk | None = None
    approved: bool = False  # the command carries an approval token (minted by the stage)
    # A fan-out: the verdicts of the further dispatches ``decision.parallel`` holds, in its order.
    parallel: tuple[Verdict, ...] = ()


def judge(
    snap: StateSnapshot,
    decision: Decision,
    policy: Policy,
    *,
    environment: str,
    declared_approval: bool,
    now: datetime,
) -> Verdict:
    """The verdict on ``decision`` for the run in ``snap``; ``declared_approval``: the tool itself says
    every call needs approval (its catalogue entry)."""
    action = decision.action
    if action is DecisionAction.compensate:
        return Verdict(decision, ALLOWED, "an undo is always allowed", policy.version)
    if action not in (DecisionAction.dispatch, DecisionAction.wait):
        return Verdict(decision, None, None, policy.version)
    over = over_budget(snap, decision, policy.budgets_for(snap.request.workflow), now)
    if over is not None:
        return _refuse(decision, over, policy)
    if action is DecisionAction.wait or decision.step is None or decision.tool is None:
        return Verdict(decision, None, None, policy.version)
    reason = policy.approval_reason(decision.tool, decision.arguments, snap.request.workflow, environment)
    if reason is None and declared_approval:
        reason = f"tool {decision.tool} declares that every call needs approval"
    if reason is None:
        return Verdict(decision, ALLOWED, None, policy.version)
    digest = arguments_digest(decision.arguments)
    held = snap.approval(decision.step)
    if held is not None and held.arguments_digest == digest:
        if held.status is ApprovalStatus.granted:
            why = f"approved by {held.by}" + (f": {held.note}" if held.note else "")
            return Verdict(decision, ALLOWED, why, policy.version, approved=True)
        if held.status is ApprovalStatus.requested:
            return Verdict(_waiting(decision, reason), APPROVAL, reason, policy.version)
        if held.status is ApprovalStatus.expired:
            waited = round((held.expires_at - held.requested_at).total_seconds())
            return _refuse(decision, f"approval of step {decision.step} not given within {waited} s", policy)
        return _refuse(decision, f"approval of step {decision.step} denied by {held.by}", policy)
    # No request yet for exactly these arguments (a changed argument needs a new approval).
    ask = ApprovalAsk(
        request_id=stable_id(snap.run_id, decision.step, digest, "approval"),
        step=decision.step,
        tool=decision.tool,
        arguments=dict(decision.arguments),
        digest=digest,
        reason=reason,
        requested_at=now,
        expires_at=now + timedelta(seconds=policy.approval_timeout_s),
    )
    return Verdict(_waiting(decision, reason), APPROVAL, reason, policy.version, ask=ask)


def over_budget(snap: StateSnapshot, decision: Decision, budgets: Budgets, now: datetime) -> str | None:
    """The first budget this decision would exceed, named with its limit and the run's count; or None."""
    if budgets.max_steps is not None and snap.decisions + 1 > budgets.max_steps:
        return f"budget max_steps={budgets.max_steps} exceeded: this would be decision {snap.decisions + 1}"
    if budgets.max_wall_time_s is not None:
        elapsed = (now - snap.created_at).total_seconds()
        if elapsed > budgets.max_wall_time_s:
            return f"budget max_wall_time_s={budgets.max_wall_time_s:g} exceeded: the run is {elapsed:.0f} s old"
    tokens = snap.tokens + decision.prompt_tokens + decision.completion_tokens
    if budgets.max_tokens is not None and tokens > budgets.max_tokens:
        return f"budget max_tokens={budgets.max_tokens} exceeded: the run has spent {tokens} tokens"
    cost = snap.cost_usd + decision.cost_usd
    if budgets.max_cost_usd is not None and cost > budgets.max_cost_usd:
        return f"budget max_cost_usd={budgets.max_cost_usd:g} exceeded: the run has spent ${cost:.4f}"
    calls, limit = snap.tool_calls + 1, budgets.max_tool_calls
    if decision.action is DecisionAction.dispatch and limit is not None and calls > limit:
        return f"budget max_tool_calls={limit} exceeded: this would be tool call {calls}"
    return None


def _waiting(decision: Decision, reason: str) -> Decision:
    # No ``tool`` on the recorded wait: a wait with a tool means "waiting for that tool to be deployed"
    # and is woken by the catalogue; this one is woken by the approval (a new snapshot).
    return replace(
        decision,
        action=DecisionAction.wait,
        tool=None,
        reason=f"waiting for approval of step {decision.step}: {reason}",
        context={**decision.context, "proposed_tool": decision.tool},
    )


def _refuse(decision: Decision, reason: str, policy: Policy) -> Verdict:
    proposed = {
        "action": decision.action.value,
        "step": decision.step,
        "tool": decision.tool,
        "arguments": decision.arguments,
        "reason": decision.reason,
    }
    escalation = replace(
        decision,
        action=DecisionAction.escalate,
        tool=None,
        arguments={},
        reason=f"guard: {reason}",
        context={**decision.context, "proposed": proposed},
    )
    return Verdict(escalation, REFUSED, reason, policy.version)
