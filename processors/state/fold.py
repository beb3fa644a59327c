"""The fold: a run's events, applied in order, give its state. Pure; no I/O.

Every applied event bumps the version by one. Applying an event twice is a no-op (its id is
remembered), which is what makes at-least-once delivery safe: after a crash the state processor
re-reads events its changelog already reflects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field
from streamagent.processors.workflow import Workflow, default_workflows

from streamagent.errors import Unprocessable
from streamagent.events import (
    STALE_MEMORY,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalState,
    ApprovalStatus,
    CommandLost,
    CommandResent,
    DecisionAction,
    DecisionRecorded,
    Event,
    MemoryChanged,
    OnboardingRequest,
    ParallelDispatch,
    RunCancelRequested,
    RunCompleted,
    RunDeadlineExceeded,
    RunFailed,
    RunPlan,
    RunRequested,
    RunStatus,
    StateSnapshot,
    StepState,
    StepStatus,
    ToolResult,
    ToolStatus,
    command_id,
    is_cancel,
    requested_event_id,
)

_ENDINGS = {
    DecisionAction.complete: RunStatus.completed,
    DecisionAction.fail: RunStatus.failed,
    DecisionAction.escalate: RunStatus.escalated,
}

# Statuses a repeated result of the step's own command must not change.
_SETTLED = (StepStatus.succeeded, StepStatus.failed, StepStatus.compensating, StepStatus.compensated)

# How many applied event ids a run remembers; a run has a few dozen events, so this is "all".
MAX_REMEMBERED = 1000


class RunState(BaseModel):
    """What the state table holds per run: the snapshot plus the ids of applied events.

    ``admitted`` is False while the run waits for capacity (the stack's bound on runs in flight):
    its request is folded and durable, but no snapshot goes to the decision layer yet.
    """

    model_config = ConfigDict(frozen=True)

    snapshot: StateSnapshot
    applied: list[str] = Field(default_factory=list)
    admitted: bool = True


@dataclass(frozen=True)
class Applied:
    state: RunState
    changed: bool
    # The new state asks the decision layer for a decision: publish exactly one snapshot.
    publish: bool = False


_IN_FLIGHT = (StepStatus.dispatched, StepStatus.compensating)


def in_flight(snap: StateSnapshot) -> list[StepState]:
    """Steps whose command was sent and whose result has not been folded yet."""
    return [s for s in snap.steps if s.status in _IN_FLIGHT and not (s.status is StepStatus.compensating and s.error)]


def is_child_step(workflow: Workflow | None, step: StepState) -> bool:
    """A step whose "command" started a child run (not an undo: an undo calls a tool)."""
    if workflow is None or step.status is not StepStatus.dispatched:
        return False
    declared = next((s for s in workflow.steps if s.name == step.name), None)
    return declared is not None and declared.workflow is not None


def loss_checked(snap: StateSnapshot, workflow: Workflow | None) -> list[StepState]:
    """The in-flight steps whose command may be found lost. Not a running child run: it may take long,
    it answers when it ends, and its request, if lost, is the same run when started again."""
    return [s for s in in_flight(snap) if not is_child_step(workflow, s)]


def _must_end(snap: StateSnapshot, workflow: Workflow) -> bool:
    """A running run that ends whatever its child runs still do: past its deadline, or a branch failed in
    a workflow that stops on a branch failure. Its children are ended with it (the decision processor)."""
    stops = workflow.on_branch_failure == "stop" and any(s.status is StepStatus.failed for s in snap.steps)
    return snap.status is RunStatus.running and (snap.deadline_exceeded or stops)


def needs_decision(snap: StateSnapshot, workflow: Workflow | None = None) -> bool:
    """Whether the decider has something to decide on this state.

    Not while a result waits for the decision that caused it (the two travel on different topics),
    nor once the run is over unless an abandoned run still has something to undo. While a command is
    in flight, only a workflow that fans out (``max_parallel`` > 1) asks again, and only when a step is
    ready and there is room for it: its result will come otherwise. This is what keeps the loop at one
    snapshot and one decision per step: a recorded decision that only marks steps dispatched asks for
    nothing unless it left a ready step and room.
    """
    if any(s.command_id is not None and s.decision_id is None for s in snap.steps):
        return False
    if snap.status is RunStatus.running and snap.cancelled is not None:
        return True  # an operator cancelled it: it ends now, whatever is in flight (those results only land)
    workflow = workflow or default_workflows().get(snap.request.workflow)
    flying = in_flight(snap)
    if (
        flying
        and workflow is not None
        and all(is_child_step(workflow, s) for s in flying)
        and _must_end(snap, workflow)
    ):
        return True  # a child run is not waited for by a run that must end: the child is ended with it
    if flying:
        return (
            snap.status is RunStatus.running
            and workflow is not None
            and workflow.max_parallel > 1
            and not snap.deadline_exceeded
            and workflow.room(snap) > 0
            and bool(workflow.ready(snap))
        )
    if snap.status is RunStatus.running:
        return True
    return workflow is not None and workflow.undo_pending(snap)


def apply(state: RunState | None, event: Event, default_deadline_s: float, workflow: Workflow | None = None) -> Applied:
    """Fold one event; ``workflow`` is the run's (default: the repository's workflow the request names)."""
    if workflow is None:
        name = event.workflow if isinstance(event, RunRequested) else state.snapshot.request.workflow if state else ""
        workflow = default_workflows().get(name)
    if state is not None and event.event_id in state.applied:
        return Applied(state, changed=False)
    if isinstance(event, RunRequested):
        if state is not None:
            if event.event_id == requested_event_id(event.run_id):
                return Applied(state, changed=False)  # the same request again (intake's dedupe by run id)
            raise Unprocessable("duplicate-run", f"run {event.run_id} was already requested")
        if workflow is None:
            raise Unprocessable("unknown_workflow", f"run {event.run_id} names unknown workflow {event.workflow!r}")
        return Applied(_start(event, default_deadline_s, workflow), changed=True, publish=True)
    if state is None:
        raise Unprocessable("unknown-run", f"{event.type} for run {event.run_id} that was never requested")
    moved = _next(state.snapshot, event)
    if isinstance(event, CommandLost):
        snap = _lost(moved, event)
    elif isinstance(event, CommandResent):
        snap = _resent(moved, event)
    elif isinstance(event, DecisionRecorded):
        snap = _spent(_decision(moved, event), event)
        if plan := _plan(moved, event):
            snap = snap.model_copy(update=plan)
    elif isinstance(event, ApprovalRequested):
        snap = _approval_requested(moved, event)
    elif isinstance(event, ApprovalGranted | ApprovalDenied | ApprovalExpired):
        snap = _approval_answered(moved, event)
    elif isinstance(event, ToolResult):
        _check_result(moved, event, workflow)
        snap = _tool_spent(_result(moved, event), moved, event)
    elif isinstance(event, RunCompleted):
        snap = _end(moved, RunStatus.completed, event.reason)
    elif isinstance(event, RunFailed):
        snap = _end(moved, RunStatus(event.status.value), event.reason)
    elif isinstance(event, MemoryChanged):
        snap = _memory_changed(moved, event)
    elif isinstance(event, RunCancelRequested):
        snap = _cancel(moved, event)
    elif isinstance(event, RunDeadlineExceeded):
        snap = moved.model_copy(update={"deadline_exceeded": True}) if moved.status is RunStatus.running else moved
    else:
        raise Unprocessable("unexpected-event", f"{event.type} is not a run event")
    applied = [*state.applied, event.event_id][-MAX_REMEMBERED:]
    # Only an event that changed what the run is (not just its version: stale evidence, a repeated
    # ending, a result delivered again) may ask for a decision.
    # A recorded wait asks for nothing either: the next decision comes with the next event (or the deadline).
    # Nor does a request for approval: the run waits for the answer, which asks for the decision.
    waited = (isinstance(event, DecisionRecorded) and event.action is DecisionAction.wait) or isinstance(
        event, ApprovalRequested
    )
    publish = snap.redrive_command_id is not None or (
        snap is not moved and not waited and needs_decision(snap, workflow)
    )
    return Applied(state.model_copy(update={"snapshot": snap, "applied": applied}), changed=True, publish=publish)


def _start(event: RunRequested, default_deadline_s: float, workflow: Workflow) -> RunState:
    request = OnboardingRequest(
        company_name=event.company_name,
        company_domain=event.company_domain,
        contact_name=event.contact_name,
        contact_email=event.contact_email,
        goal=event.goal,
        requested_by=event.requested_by,
        labels=event.labels,
        workflow=workflow.name,
        parent_run_id=event.parent_run_id,
        parent_step=event.parent_step,
        parent_command_id=event.parent_command_id,
    )
    deadline = event.occurred_at + timedelta(seconds=event.deadline_s or default_deadline_s)
    snap = StateSnapshot(
        run_id=event.run_id,
        version=1,
        status=RunStatus.running,
        request=request,
        steps=[StepState(name=name) for name in workflow.step_names],
        created_at=event.occurred_at,
        updated_at=event.occurred_at,
        deadline_at=deadline,
        last_event_id=event.event_id,
    )
    return RunState(snapshot=snap, applied=[event.event_id])


def _next(snap: StateSnapshot, event: Event) -> StateSnapshot:
    return snap.model_copy(
        update={
            "version": snap.version + 1,
            "updated_at": event.occurred_at,
            "last_event_id": event.event_id,
            "redrive_command_id": None,
        }
    )


def _lost(snap: StateSnapshot, event: CommandLost) -> StateSnapshot:
    """A command found lost: ask for it again, or, past the bound, fail its step with the evidence."""
    step = _step(snap, event.step)
    if step.command_id != event.command_id or step not in in_flight(snap):
        return snap  # answered meanwhile: the evidence is stale
    if not event.give_up:
        step = step.model_copy(update={"redrives": event.redrive})
        return _replace_step(snap, step).model_copy(update={"redrive_command_id": event.command_id})
    error = f"lost: no result after {step.redrives} re-send(s); {event.evidence}"
    if step.status is StepStatus.compensating:
        return _replace_step(snap, step.model_copy(update={"error": f"compensation failed: {error}"}))
    return _replace_step(snap, step.model_copy(update={"status": StepStatus.failed, "error": error}))


def _resent(snap: StateSnapshot, event: CommandResent) -> StateSnapshot:
    """The copy of a lost command is on its way: judge the copy from now on."""
    step = _step(snap, event.step)
    if step.command_id != event.command_id or step not in in_flight(snap):
        return snap
    update = {
        "command_partition": event.command_partition,
        "command_offset": event.command_offset,
        "dispatched_at": event.occurred_at,
    }
    return _replace_step(snap, step.model_copy(update=update))


def _replace_step(snap: StateSnapshot, step: StepState) -> StateSnapshot:
    return snap.model_copy(update={"steps": [step if s.name == step.name else s for s in snap.steps]})


def _step(snap: StateSnapshot, name: str) -> StepState:
    try:
        return snap.step(name)
    except KeyError as exc:
        raise Unprocessable("unknown-step", f"run {snap.run_id} has no step {name!r}") from exc


def _superseded(snap: StateSnapshot) -> StateSnapshot:
    return snap.model_copy(update={"superseded_decisions": snap.superseded_decisions + 1})


def _decision(snap: StateSnapshot, event: DecisionRecorded) -> StateSnapshot:
    """Take a decision if it still applies to the run; otherwise count it as superseded.

    Commands carry a stable id per (run, step), so a superseded dispatch that reached its tool
    anyway is deduplicated there; here it only must not move the run.
    """
    if event.action is DecisionAction.compensate and event.step is not None:
        step = _step(snap, event.step)
        if step.status is not StepStatus.succeeded:
            return _superseded(snap)
        # The step now points at the undo's command, so a re-drive re-sends the undo.
        update = {
            "status": StepStatus.compensating,
            "decision_id": event.decision_id,
            "command_id": event.command_id,
            **_where(event),
        }
        return _replace_step(snap, step.model_copy(update=update))
    if snap.status.terminal:
        return _superseded(snap)
    if event.action in _ENDINGS:
        # The run ends with the decision, not with the RunCompleted/RunFailed that announces it, so
        # no snapshot in between invites the decider to decide the same ending again.
        status = _ENDINGS[event.action]
        if status is RunStatus.failed and is_cancel(snap, event.reason):
            status = RunStatus.cancelled  # the operator's cancel: the decision that ends the run with it
        return snap.model_copy(update={"status": status, "reason": event.reason})
    if event.action is DecisionAction.wait:
        return snap.model_copy(update={"reason": event.reason})  # what the run waits for, shown while running
    if event.action is not DecisionAction.dispatch or event.step is None:
        return snap
    if snap.reason is not None:
        snap = snap.model_copy(update={"reason": None})  # no longer waiting
    # A fan-out names several steps, each with its own command: each is taken in (or not) on its own.
    taken = False
    for dispatch in event.dispatched():
        snap, took = _dispatch(snap, event, dispatch)
        taken = taken or took
    return snap if taken else _superseded(snap)


def _dispatch(snap: StateSnapshot, event: DecisionRecorded, dispatch: ParallelDispatch) -> tuple[StateSnapshot, bool]:
    step = _step(snap, dispatch.step)
    where = {
        "command_partition": dispatch.command_partition,
        "command_offset": dispatch.command_offset,
        "dispatched_at": event.occurred_at,
        "redrives": 0,
    }
    if step.status is StepStatus.pending:
        update = {
            "status": StepStatus.dispatched,
            "command_id": dispatch.command_id,
            "decision_id": event.decision_id,
            "attempts": step.attempts + 1,
            **where,
        }
        return _replace_step(snap, step.model_copy(update=update)), True
    if step.command_id == dispatch.command_id and step.decision_id is None:
        # The tool's result was folded before the decision that caused it (they travel on two
        # topics): the decision is the one that ran, not a stale one. It is recorded as the dispatch
        # would have been, so the step ends the same whichever of the two topics was read first
        # (`streamagent replay` folds them in timestamp order and compares with the live state).
        update = {"decision_id": event.decision_id, "attempts": step.attempts + 1, **where}
        return _replace_step(snap, step.model_copy(update=update)), True
    return snap, False


def _spent(snap: StateSnapshot, event: DecisionRecorded) -> StateSnapshot:
    """What the decision adds to the run's counts, for the guard's budgets: one decision, its model
    tokens and cost, and a tool call per command it sent (each dispatch or undo the fold took in)."""
    commands = {d.command_id for d in event.dispatched()}
    sent = sum(1 for s in snap.steps if s.command_id in commands and s.decision_id == event.decision_id)
    return snap.model_copy(
        update={
            "last_decision_id": event.decision_id,
            "decisions": snap.decisions + 1,
            "tool_calls": snap.tool_calls + sent,
            "tokens": snap.tokens + event.prompt_tokens + event.completion_tokens,
            "cost_usd": snap.cost_usd + event.cost_usd,
        }
    )


def _approval_requested(snap: StateSnapshot, event: ApprovalRequested) -> StateSnapshot:
    if any(a.request_id == event.request_id for a in snap.approvals) or snap.status.terminal:
        return snap
    held = ApprovalState(
        request_id=event.request_id,
        step=event.step,
        tool=event.tool,
        arguments_digest=event.arguments_digest,
        reason=event.reason,
        requested_at=event.occurred_at,
        expires_at=event.expires_at,
    )
    return snap.model_copy(update={"approvals": [*snap.approvals, held]})


def _approval_answered(snap: StateSnapshot, event: ApprovalGranted | ApprovalDenied | ApprovalExpired) -> StateSnapshot:
    """The answer to a pending request; an answer to no pending request (twice, too late) changes nothing.

    A denial fails the held step, so the workflow undoes what the run did, as for any failed step."""
    held = next((a for a in snap.approvals if a.request_id == event.request_id), None)
    if held is None or held.status is not ApprovalStatus.requested or snap.status.terminal:
        return snap
    if isinstance(event, ApprovalExpired):
        answered = held.model_copy(update={"status": ApprovalStatus.expired, "decided_at": event.occurred_at})
    else:
        status = ApprovalStatus.granted if isinstance(event, ApprovalGranted) else ApprovalStatus.denied
        answered = held.model_copy(
            update={"status": status, "by": event.by, "note": event.note or None, "decided_at": event.occurred_at}
        )
    snap = snap.model_copy(
        update={"approvals": [answered if a.request_id == held.request_id else a for a in snap.approvals]}
    )
    if isinstance(event, ApprovalDenied):
        step = _step(snap, held.step)
        if step.status is StepStatus.pending:
            error = f"denied: approval refused by {event.by}" + (f": {event.note}" if event.note else "")
            snap = _replace_step(snap, step.model_copy(update={"status": StepStatus.failed, "error": error}))
    return snap


def _plan(snap: StateSnapshot, event: DecisionRecorded) -> dict[str, RunPlan]:
    """The run's plan from the first decision that recorded one; kept as is afterwards (one plan per run)."""
    if snap.plan is not None:
        return {}
    plan = RunPlan.of_context(event.context, event.decision_id)
    return {"plan": plan} if plan is not None else {}


def _where(event: DecisionRecorded) -> dict[str, object]:
    """Where the decision's command sits in its topic, and since when: the re-drive's evidence."""
    return {
        "command_partition": event.command_partition,
        "command_offset": event.command_offset,
        "dispatched_at": event.occurred_at,
        "redrives": 0,
    }


def _memory_changed(snap: StateSnapshot, event: MemoryChanged) -> StateSnapshot:
    """A step held for approval on what memory no longer says is decided again (the person must approve
    what will be done); anything else is a record (a dispatched step's tool checks before its call, a done
    step keeps its effect)."""
    if snap.status is not RunStatus.running or snap.last_decision_id != event.decision_id:
        return snap
    step = _step(snap, event.step)
    held = snap.approval(event.step)
    if step.status is not StepStatus.pending or held is None or held.status is not ApprovalStatus.requested:
        return snap
    now_text = f"v{event.version}" if event.version else "deleted"
    before = f"v{event.read_version}" if event.read_version else "none"
    reason = f"{event.ref} changed {before} → {now_text} while step {event.step} waited for approval: decided again"
    return snap.model_copy(update={"reason": reason})


def _check_result(snap: StateSnapshot, event: ToolResult, workflow: Workflow | None) -> None:
    """A result counts only from the tool the step's command goes to, for that command's id: a tool's key
    (streamagent.authn) proves which tool wrote it, this proves the run sent that tool that command."""
    # The step's command as folded, or (a result read before its decision: two topics) the id the
    # decision processor gives that step's command.
    dispatched = _step(snap, event.step).command_id
    if event.command_id not in (dispatched, command_id(snap.run_id, event.step, event.operation)):
        raise Unprocessable(
            "unknown-command", f"{event.command_id} is not a command run {snap.run_id} sent for step {event.step!r}"
        )
    declared = next((s for s in workflow.steps if s.name == event.step), None) if workflow is not None else None
    if declared is None:
        return
    if event.operation == "compensate":
        tool = declared.compensation.tool if declared.compensation is not None else None
    else:
        tool = declared.tool
    if event.tool != tool:
        raise Unprocessable(
            "wrong-tool",
            f"a {event.operation} result of step {event.step!r} from {event.tool!r}; the step's tool is {tool!r}",
        )


def _tool_spent(snap: StateSnapshot, before: StateSnapshot, event: ToolResult) -> StateSnapshot:
    """A model-backed tool's tokens and cost join the run's spending (the guard's budgets), once: a
    result that changed nothing (delivered again) was counted when it first arrived. They are also kept
    apart (``tool_tokens``): the model decider's caps add them to its ledger, which has decisions only.
    A child workflow's step answers with the child's whole spending: its tokens, cost and tool calls."""
    if snap is before or not (event.prompt_tokens or event.completion_tokens or event.cost_usd or event.tool_calls):
        return snap
    tokens = event.prompt_tokens + event.completion_tokens
    return snap.model_copy(
        update={
            # A child run's commands count as the parent's tool calls (its budgets see them).
            "tool_calls": snap.tool_calls + event.tool_calls,
            "tokens": snap.tokens + tokens,
            "cost_usd": snap.cost_usd + event.cost_usd,
            "tool_tokens": snap.tool_tokens + tokens,
            "tool_cost_usd": snap.tool_cost_usd + event.cost_usd,
        }
    )


def _result(snap: StateSnapshot, event: ToolResult) -> StateSnapshot:
    step = _step(snap, event.step)
    if event.operation == "compensate":
        if event.status is ToolStatus.succeeded:
            return _replace_step(snap, step.model_copy(update={"status": StepStatus.compensated}))
        # A failed undo stays visible (status compensating, with the error) and is not retried.
        return _replace_step(snap, step.model_copy(update={"error": f"compensation failed: {event.error}"}))
    if step.status in _SETTLED and step.command_id == event.command_id:
        return snap  # the same outcome, delivered again under a new event id
    if step.status in (StepStatus.compensating, StepStatus.compensated):
        return snap  # a late copy of the result that the undo already acted on
    if step.command_id not in (None, event.command_id):
        raise Unprocessable("unknown-command", f"{event.command_id} is not the command of step {step.name}")
    if event.error_kind == STALE_MEMORY:
        # Not executed: what the decision read changed before the call. The step is decided again, on the
        # new version, if it still waits for that decision's command (a late copy changes nothing).
        if step.status is not StepStatus.dispatched or step.decision_id != event.output.get("decision_id"):
            return snap
        return _replace_step(
            snap, step.model_copy(update={"status": StepStatus.pending, "error": f"{STALE_MEMORY}: {event.error}"})
        )
    ok = event.status is ToolStatus.succeeded
    if not ok and event.error_kind == "deadline":
        # The step ran out of time (its command's deadline is at most the run's, and a tool gives up
        # as soon as the next retry could not finish in time): the run is abandoned, not failed,
        # whichever of this result and the deadline timer's event arrives first.
        snap = snap.model_copy(update={"deadline_exceeded": True})
    return _replace_step(
        snap,
        step.model_copy(
            update={
                "status": StepStatus.succeeded if ok else StepStatus.failed,
                "command_id": event.command_id,
                "output": event.output,
                "error": None if ok else f"{event.error_kind or 'error'}: {event.error}",
                "finished_at": event.occurred_at,
            }
        ),
    )


def _cancel(snap: StateSnapshot, event: RunCancelRequested) -> StateSnapshot:
    """An operator's cancel marks a running run; the decision processor ends it (and its live children).
    A run that has ended, or is already being cancelled, keeps what it is (the event is on its timeline)."""
    if snap.status.terminal or snap.cancelled is not None:
        return snap
    return snap.model_copy(update={"cancelled": event.says})


def _end(snap: StateSnapshot, status: RunStatus, reason: str) -> StateSnapshot:
    if snap.status.terminal:
        return snap
    return snap.model_copy(update={"status": status, "reason": reason})
