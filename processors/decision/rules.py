"""The deterministic decider: walks the run's workflow (data, see workflows/). No network, no randomness."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from streamagent.processors.decision.arguments import ArgumentCheck, no_check
from streamagent.processors.decision.decider import Decision, context_of
from streamagent.processors.decision.reads import read
from streamagent.processors.workflow import (
    Step,
    ToolAvailability,
    UnknownWorkflow,
    Workflow,
    Workflows,
    default_workflows,
    every_tool_available,
    lookup,
)

from streamagent.events import DecisionAction, RunStatus, StateSnapshot, StepStatus
from streamagent.memory import MemoryReader, no_memory


def waiting_for(tool: str) -> str:
    return f"waiting for tool {tool}"


class RulesDecider:
    name = "rules"

    def __init__(
        self,
        workflows: Workflows | Workflow | None = None,
        available: ToolAvailability = every_tool_available,
        check: ArgumentCheck = no_check,
        memory: MemoryReader = no_memory,
    ) -> None:
        if isinstance(workflows, Workflow):
            workflows = {workflows.name: workflows}
        self.workflows: Workflows = default_workflows() if workflows is None else workflows
        self.available = available
        # Do a dispatch's arguments fit the input schema the tool's running version announced? If
        # not, the run escalates with the reason (tool, version, mismatch): never a wrong call.
        self.check = check
        # The shared memory table: a step that reads an entity is built from its current version.
        self.memory = memory

    def decide(self, snapshot: StateSnapshot) -> Decision | None:
        try:
            workflow = lookup(self.workflows, snapshot.request.workflow)
        except UnknownWorkflow as exc:
            if snapshot.status is not RunStatus.running:
                return None
            return Decision(DecisionAction.escalate, str(exc), context=context_of(snapshot, []))
        context = context_of(snapshot, sorted(t for t in {s.tool for s in workflow.steps} if self.available(t)))
        if snapshot.status is not RunStatus.running:
            return self._compensation(workflow, snapshot, context)
        if snapshot.deadline_exceeded:
            return Decision(
                DecisionAction.escalate,
                f"deadline {snapshot.deadline_at.isoformat()} passed before the run finished",
                context=context,
            )
        failed = next((s for s in snapshot.steps if s.status is StepStatus.failed), None)
        flying = [s for s in snapshot.steps if s.status is StepStatus.dispatched]
        ready = workflow.ready(snapshot)
        # A step that fails for good ends the run, once nothing else of a fan-out still runs or may
        # start (``on_branch_failure``: the other branches finish, or nothing further starts).
        # A child run is not waited for when a branch failed and the workflow stops: the run ends, and the
        # decision processor ends the child with it.
        awaited = [s for s in flying if not (workflow.on_branch_failure == "stop" and workflow.step(s.name).workflow)]
        if failed is not None and (workflow.max_parallel <= 1 or not (awaited or ready)):
            step = workflow.step(failed.name)
            action = DecisionAction.escalate if step.on_failure == "escalate" else DecisionAction.fail
            return Decision(action, f"step {step.name} failed: {failed.error}", step=step.name, context=context)
        if flying and workflow.max_parallel <= 1:
            return None  # its result is on the way
        chosen = ready[: workflow.room(snapshot)]
        if not chosen:
            if flying or any(s.status is not StepStatus.succeeded for s in snapshot.steps):
                return None  # results are on the way; what is left needs them
            return Decision(DecisionAction.complete, "every step succeeded", context=context)
        return self._dispatch(workflow, snapshot, chosen, context)

    def _dispatch(
        self, workflow: Workflow, snapshot: StateSnapshot, chosen: list[Step], context: dict[str, Any]
    ) -> Decision:
        """One decision dispatching the chosen ready steps (one, or a fan-out of several)."""
        results = snapshot.results()
        startable = [step for step in chosen if self.available(step.tool)]
        if not startable:
            # Recorded, so the run shows what it waits for; it escalates at its deadline.
            step = chosen[0]
            wait = waiting_for(step.tool)
            return Decision(DecisionAction.wait, wait, step=step.name, tool=step.tool, context=context)
        dispatches: list[Decision] = []
        for step in startable:
            memory = read(step, snapshot, results, self.memory)
            if memory.shown:
                context.setdefault("memory", {}).update(memory.shown)
            arguments = step.build(snapshot.request, results, snapshot.run_id, memory.facts)
            mismatch = self.check(step.tool, arguments)
            if mismatch is not None:
                return Decision(
                    DecisionAction.escalate,
                    f"step {step.name}: {mismatch}",
                    step=step.name,
                    tool=step.tool,
                    context=context,
                )
            why = f"{step.name} is the next step and {', '.join(step.needs) or 'nothing'} it needs is done"
            dispatches.append(
                Decision(
                    DecisionAction.dispatch,
                    why,
                    step=step.name,
                    tool=step.tool,
                    arguments=arguments,
                    memory=memory.versions,
                )
            )
        first, *more = dispatches
        if more:
            names = ", ".join(d.step or "" for d in dispatches)
            reason = f"{names} are ready (what each needs is done): started together"
            return replace(first, reason=reason, context=context, parallel=tuple(more))
        return replace(first, context=context)

    def _compensation(self, workflow: Workflow, snapshot: StateSnapshot, context: dict[str, Any]) -> Decision | None:
        """Undo, last step first, what an abandoned run (failed, escalated, denied, past its deadline) created."""
        if not workflow.undo_pending(snapshot):
            return None
        if any(s.status is StepStatus.compensating for s in snapshot.steps):
            return None  # one undo at a time
        results = snapshot.results()
        # Last finished first (a run of one step at a time: the reverse of the declared order); a step
        # folded before this field existed counts from when it was started.
        order = sorted(
            enumerate(snapshot.steps),
            key=lambda p: (p[1].finished_at or p[1].dispatched_at or snapshot.created_at, p[0]),
            reverse=True,
        )
        for _, state in order:
            step = workflow.step(state.name)
            if state.status is StepStatus.succeeded and step.compensation is not None:
                # Why the run is being undone, in its own words (a denial names who denied it).
                why = snapshot.reason or ("its deadline passed" if snapshot.deadline_exceeded else "it ended")
                return Decision(
                    DecisionAction.compensate,
                    f"run {snapshot.status.value} ({why}): undo {step.name}",
                    step=step.name,
                    tool=step.compensation.tool,
                    arguments=step.compensation.args.build(snapshot.request, results, snapshot.run_id),
                    context=context,
                )
        return None
