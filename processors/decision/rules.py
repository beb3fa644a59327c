"""The deterministic decider: walks the declared workflow. No network, no randomness."""

from __future__ import annotations

from typing import Any

from processors.decision.decider import Decision, context_of
from processors.workflow import ONBOARDING, Workflow
from streamagent.events import DecisionAction, RunStatus, StateSnapshot, StepStatus


class RulesDecider:
    name = "rules"

    def __init__(self, workflow: Workflow = ONBOARDING) -> None:
        self.workflow = workflow

    def decide(self, snapshot: StateSnapshot) -> Decision | None:
        context = context_of(snapshot, sorted({s.tool for s in self.workflow.steps}))
        if snapshot.status is not RunStatus.running:
            return self._compensation(snapshot, context)
        if snapshot.deadline_exceeded:
            return Decision(
                DecisionAction.escalate,
                f"deadline {snapshot.deadline_at.isoformat()} passed before the run finished",
                context=context,
            )
        results = snapshot.results()
        for state in snapshot.steps:
            if state.status is StepStatus.failed:
                step = self.workflow.step(state.name)
                action = DecisionAction.escalate if step.on_failure == "escalate" else DecisionAction.fail
                return Decision(action, f"step {step.name} failed: {state.error}", step=step.name, context=context)
        for state in snapshot.steps:
            if state.status is StepStatus.succeeded:
                continue
            if state.status is StepStatus.dispatched:
                return None  # its result is on the way
            step = self.workflow.step(state.name)
            missing = [n for n in step.needs if n not in results]
            if missing:
                return None
            return Decision(
                DecisionAction.dispatch,
                f"{step.name} is the next step and {', '.join(step.needs) or 'nothing'} it needs is done",
                step=step.name,
                tool=step.tool,
                arguments=step.build(snapshot.request, results, snapshot.run_id),
                context=context,
            )
        return Decision(DecisionAction.complete, "every step succeeded", context=context)

    def _compensation(self, snapshot: StateSnapshot, context: dict[str, Any]) -> Decision | None:
        """Undo, last step first, what an abandoned run (deadline passed) created."""
        if not self.workflow.undo_pending(snapshot):
            return None
        if any(s.status is StepStatus.compensating for s in snapshot.steps):
            return None  # one undo at a time
        results = snapshot.results()
        for state in reversed(snapshot.steps):
            step = self.workflow.step(state.name)
            if state.status is StepStatus.succeeded and step.compensation is not None:
                tool, build = step.compensation
                return Decision(
                    DecisionAction.compensate,
                    f"run abandoned after its deadline: undo {step.name}",
                    step=step.name,
                    tool=tool,
                    arguments=build(snapshot.request, results, snapshot.run_id),
                    context=context,
                )
        return None
