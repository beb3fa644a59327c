"""Does the model's answer hold? Checked against the workflow now and the catalogue's schemas.

The model proposes; this code disposes. An answer is taken only if its tool is offered (or a
pseudo-tool), the step it runs is the workflow's to run now (not done, every step it needs done),
and its arguments fit the input schema the tool announced. Otherwise ``Refused`` says why, in words
the repair turn quotes back to the model.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from streamagent.processors.decision.arguments import ArgumentCheck
from streamagent.processors.decision.decider import Decision
from streamagent.processors.decision.llm.answer import ModelAnswer, Refused
from streamagent.processors.decision.rules import waiting_for
from streamagent.processors.workflow import Step, Workflow

from streamagent.events import DecisionAction, StateSnapshot, StepStatus


def judge(
    answer: ModelAnswer,
    snapshot: StateSnapshot,
    workflow: Workflow,
    offered: Collection[str],
    check: ArgumentCheck,
    context: dict[str, Any],
    taken: Collection[str] = (),
) -> Decision:
    """The decision ``answer`` stands for, or ``Refused``. ``taken``: steps other calls of the same answer
    already start (a fan-out), so a second call of one tool goes to the tool's next step."""
    pending = [s for s in snapshot.steps if s.status is not StepStatus.succeeded]
    if answer.tool == "complete":
        if pending:
            raise Refused(f"complete refused: steps {', '.join(s.name for s in pending)} have not succeeded")
        return Decision(DecisionAction.complete, "every step succeeded (model)", context=context)
    if answer.tool == "escalate":
        reason = str(answer.arguments.get("reason") or "").strip()
        if not reason:
            raise Refused("escalate needs a reason")
        return Decision(DecisionAction.escalate, f"the model escalated: {reason}", context=context)
    if answer.tool == "wait":
        return _wait(str(answer.arguments.get("tool") or ""), workflow, pending, offered, context)
    if answer.tool not in offered:
        known = ", ".join([*sorted(offered), "complete", "escalate", "wait"])
        raise Refused(f"unknown tool {answer.tool!r}: call one of {known}")
    # Not a step in flight (a fan-out asks while others run), nor one this answer already starts.
    startable = [s.name for s in pending if s.status is StepStatus.pending and s.name not in taken]
    step = _step_for(answer.tool, snapshot, workflow, startable)
    mismatch = check(answer.tool, answer.arguments)
    if mismatch is not None:
        raise Refused(f"arguments refused: {mismatch}")
    return Decision(
        DecisionAction.dispatch,
        f"{step.name} is the next step (model)",
        step=step.name,
        tool=step.tool,
        arguments=answer.arguments,
        context=context,
    )


def _step_for(tool: str, snapshot: StateSnapshot, workflow: Workflow, pending: list[str]) -> Step:
    """The first step not yet done that uses ``tool``; refused unless every step it needs is done."""
    results = snapshot.results()
    for name in pending:
        step = workflow.step(name)
        if step.tool != tool:
            continue
        missing = [n for n in step.needs if n not in results]
        if missing:
            raise Refused(f"step {step.name} ({tool}) is not allowed yet: it needs {', '.join(missing)} done first")
        return step
    raise Refused(f"tool {tool} has no step left to run in this workflow")


def _wait(
    tool: str, workflow: Workflow, pending: list[Any], offered: Collection[str], context: dict[str, Any]
) -> Decision:
    if tool in offered:
        raise Refused(f"wait refused: tool {tool} is available, call it")
    for state in pending:
        step = workflow.step(state.name)
        if step.tool == tool:
            return Decision(DecisionAction.wait, waiting_for(tool), step=step.name, tool=tool, context=context)
    raise Refused(f"wait refused: no remaining step uses tool {tool!r}")
