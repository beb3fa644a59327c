"""Child workflows, the state side: a child run's end is its parent step's result.

When the fold takes a child run's ending (``RunCompleted`` or ``RunFailed``), the state processor sends
the parent a ``ToolResult`` for the parent step's command, as a tool would: tool ``workflow:<child>``,
succeeded with the child's results as output, or failed (permanently) with the child's reason. It carries
what the child spent (model tokens and cost, as a model-backed tool's result does, and the child's tool
calls), so the parent's budgets count its children. Only the state role may sign such a result
(streamagent.authn), and the fold takes it only for the step that started that child.

Exactly once, across restarts. The result is a function of the ending event and the child's state after
it, its event id is derived from the child's run id, and it is produced in the batch that folds the ending,
before that batch is acknowledged (as the snapshots are). A crash before the acknowledgement redelivers
the ending: the fold takes it as already applied, and the same result is produced again, which the
parent's fold takes once (its event id).

Only the child's first ending answers: a parent that ended its child ("ended by parent") after the child
had completed does not turn the step's success into a failure.
"""

from __future__ import annotations

from typing import Any

from streamagent.processors.state.fold import RunState

from streamagent.events import (
    Event,
    RunCompleted,
    RunFailed,
    RunRequested,
    ToolResult,
    ToolStatus,
    child_tool,
    ended_by_parent_id,
    stable_id,
)

# The reason kind a failed child gives its parent's step; a child abandoned at its deadline gives "deadline",
# which the parent's fold takes as its own deadline (a child's deadline is never later than its parent's).
CHILD_FAILED = "child-failed"


# The reason kind a child request the state processor refused gives its parent's step (see ``refusal_result``).
CHILD_REFUSED = "child-refused"


def _endings(run_id: str) -> set[str]:
    """The event ids a run's ending can have: completed, ended (the decision processor), ended by its parent."""
    return {stable_id(run_id, "completed"), stable_id(run_id, "ended"), ended_by_parent_id(run_id)}


def parent_result(state: RunState, event: RunCompleted | RunFailed) -> ToolResult | None:
    """The parent step's result for a child run's ending ``event`` (folded into ``state``); None when the
    run is no child, or when another ending answered the parent first."""
    snap = state.snapshot
    request = snap.request
    if request.parent_run_id is None or request.parent_step is None or request.parent_command_id is None:
        return None
    if (_endings(snap.run_id) - {event.event_id}) & set(state.applied):
        return None
    ok = isinstance(event, RunCompleted)
    error = kind = None
    if not ok:
        error = f"child run {snap.run_id} {event.status.value}: {event.reason}"
        kind = "deadline" if snap.deadline_exceeded else CHILD_FAILED
    return _answer(
        request,
        snap.run_id,
        event,
        status=ToolStatus.succeeded if ok else ToolStatus.failed,
        output={"child_run_id": snap.run_id, **event.results} if ok else {"child_run_id": snap.run_id},
        error=error,
        error_kind=kind,
        duration_ms=max(0, int((event.occurred_at - snap.created_at).total_seconds() * 1000)),
        # All of the child's model use (its decisions' and its tools'), as a model-backed tool reports it.
        prompt_tokens=snap.tokens,
        cost_usd=snap.cost_usd,
        tool_calls=snap.tool_calls,
    )


def refusal_result(event: RunRequested, reason: str, detail: str) -> ToolResult | None:
    """The parent step's result when the fold refused the child's request ``event`` (already verified as the
    decision processor's): a permanent failure naming the reason, at once, instead of a parent that waits for
    its deadline. None for a request with no parent, and for ``duplicate-run``: that child run exists and
    answers when it ends. The event id is the one the child's ending would have had, so a redelivered request
    answers once, and a refused child never ends."""
    if event.parent_run_id is None or event.parent_step is None or event.parent_command_id is None:
        return None
    if reason == "duplicate-run":
        return None
    return _answer(
        event,
        event.run_id,
        event,
        status=ToolStatus.failed,
        output={"child_run_id": event.run_id},
        error=f"child run {event.run_id} refused ({reason}): {detail}",
        error_kind=CHILD_REFUSED,
    )


def _answer(request: RunRequested, child_run_id: str, cause: Event, **outcome: Any) -> ToolResult:
    """The parent step's result for the child run ``child_run_id`` started by ``request``: one event id per
    child, whatever the answer, so the parent takes exactly one."""
    return ToolResult(
        event_id=stable_id(child_run_id, "child-result"),
        run_id=request.parent_run_id,
        causation_id=cause.event_id,
        occurred_at=cause.occurred_at,
        command_id=request.parent_command_id,
        tool=child_tool(request.workflow),
        step=request.parent_step,
        **outcome,
    )
