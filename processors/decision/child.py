"""Child workflows, the decision side: a step that names a workflow starts a child run, and a parent that
ends while a child still runs ends the child too.

Starting. Where a tool step sends a command, a child step appends the child's ``RunRequested`` to the run
log, signed as the decision processor (the only role whose request may carry a parent, streamagent.authn).
The child's run id is derived from the parent's run, step and command id, and its event id from the
child's run id, so a re-dispatch or a redelivered decision is the same child run, folded once. The child's
request is the parent's, the step's arguments as labels (text) beside the parent's labels, and a deadline
no later than the parent's. The parent's step is dispatched as a tool step is (same command id), and the
state processor answers it with a ``ToolResult`` once the child ends (processors/state/children.py).

Ending. A parent that ends not completed (failed, escalated, cancelled) ends each child run still in flight
with a ``RunFailed`` ("parent run ... ended"; cancelled when the parent was, failed otherwise), produced
with the parent's ending by the same decision; a child that has ended meanwhile takes it as a no-op (the
fold ignores a second ending).
"""

from __future__ import annotations

from streamagent.processors.workflow import Workflow

from streamagent.config import Settings
from streamagent.events import (
    CHILD_TOOL_PREFIX,
    FailureStatus,
    RunFailed,
    RunRequested,
    StateSnapshot,
    StepStatus,
    child_run_id,
    command_id,
    ended_by_parent_id,
    now,
    requested_event_id,
)

# The shortest deadline a child gets (its parent's is nearly over): the child escalates at once.
_MIN_DEADLINE_S = 0.001


def child_request(
    settings: Settings, snap: StateSnapshot, step: str, tool: str, arguments: dict[str, object], decision_id: str
) -> RunRequested:
    """The request that starts the child run of ``step`` (``tool`` is ``workflow:<name>``)."""
    cid = command_id(snap.run_id, step)
    run_id = child_run_id(snap.run_id, step, cid)
    moment = now()
    left = (snap.deadline_at - moment).total_seconds()
    request = snap.request
    labels = {**request.labels, **{key: _text(value) for key, value in arguments.items()}}
    return RunRequested(
        event_id=requested_event_id(run_id),
        run_id=run_id,
        causation_id=decision_id,
        occurred_at=moment,
        company_name=request.company_name,
        company_domain=request.company_domain,
        contact_name=request.contact_name,
        contact_email=request.contact_email,
        goal=request.goal,
        requested_by=request.requested_by,
        # Never later than the parent's: the child's own default, or what the parent has left.
        deadline_s=max(_MIN_DEADLINE_S, min(settings.run_deadline_s, left)),
        labels=labels,
        workflow=tool[len(CHILD_TOOL_PREFIX) :],
        parent_run_id=snap.run_id,
        parent_step=step,
        parent_command_id=cid,
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def live_children(snap: StateSnapshot, workflow: Workflow | None) -> list[tuple[str, str]]:
    """(step, child run id) of each child run the parent started and has no answer from yet."""
    if workflow is None:
        return []
    names = {s.name for s in workflow.steps if s.workflow is not None}
    return [
        (s.name, child_run_id(snap.run_id, s.name, s.command_id))
        for s in snap.steps
        if s.name in names and s.status is StepStatus.dispatched and s.command_id is not None
    ]


def child_endings(
    snap: StateSnapshot, workflow: Workflow | None, decision_id: str, status: FailureStatus, reason: str
) -> list[RunFailed]:
    """The endings a parent that ends ``status`` sends its live children (none when it completes)."""
    return [
        RunFailed(
            event_id=ended_by_parent_id(run_id),
            run_id=run_id,
            causation_id=decision_id,
            decision_id=decision_id,
            # A cancel reaches the children as one; any other ending fails them.
            status=FailureStatus.cancelled if status is FailureStatus.cancelled else FailureStatus.failed,
            reason=f"parent run {snap.run_id} ended ({status.value}): {reason}",
            failed_step=None,
        )
        for _step, run_id in live_children(snap, workflow)
    ]
