"""The prepared context: a snapshot, its workflow and the offered tools, as chat messages. Pure.

Code prepares, the model only decides: the messages say the goal and the policy (system), then the
request, what was done and what it returned, what failed and why, and what remains, in order, with
the arguments the workflow prepares for each step that is ready (user).

Budget rule: tokens are counted as ``ceil(characters / 4)`` over every message's content. Over the
budget, step results (as JSON text) are truncated, the largest first: every result longer than a
level is cut to it, and the level goes down until the messages fit or reaches ``MIN_KEPT`` characters;
each cut is marked ``…[truncated N chars]``. The goal, the policy, the request and the remaining steps are never cut: a
model that cannot see them cannot decide, so such a context goes over budget rather than lose them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from streamagent.processors.decision.reads import read
from streamagent.processors.workflow import Workflow

from streamagent.events import StateSnapshot, StepStatus
from streamagent.memory import MemoryReader, no_memory

CHARS_PER_TOKEN = 4
MIN_KEPT = 80  # characters of a result kept at least, so the model still sees what it was
REMAINING_MARKER = "Remaining steps, in order (JSON):"  # the scripted fake model reads the block after it
PSEUDO_TOOLS = ("complete", "escalate", "wait")


@dataclass(frozen=True)
class OfferedTool:
    """One tool the model may call: the catalogue's view of it."""

    name: str
    description: str = ""
    input_schema: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    messages: list[dict[str, Any]]
    estimated_tokens: int
    truncated: dict[str, int]  # step -> characters cut from its result
    # step -> the memory versions its prepared arguments were built from (recorded if the model runs it)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def message_tokens(messages: Sequence[dict[str, Any]]) -> int:
    return sum(estimate_tokens(_text(m)) for m in messages)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    calls = message.get("tool_calls") or []
    return str(content) + (json.dumps(calls, sort_keys=True) if calls else "")


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def system_message(workflow: Workflow, offered: Sequence[OfferedTool]) -> str:
    steps = "\n".join(
        f"- {s.name}: tool {s.tool}" + (f", needs {', '.join(s.needs)}" if s.needs else "") for s in workflow.steps
    )
    tools = ", ".join(t.name for t in offered) or "none right now"
    if workflow.max_parallel > 1:
        at_once = (
            f"- Steps may run at once: call every ready step in one answer, one call per step (at most"
            f" {workflow.max_parallel} steps run at a time); complete, escalate and wait are answered alone.\n"
            "- A step may run only once every step it needs has succeeded; take the ready steps.\n"
        )
    else:
        at_once = (
            "- One step at a time: answer with exactly one call.\n"
            "- A step may run only once every step it needs has succeeded; take the first ready step.\n"
        )
    return (
        f'You decide the next action of one run of the workflow "{workflow.name}".\n'
        f"Goal: {workflow.goal}\n"
        f"Steps, in order:\n{steps}\n"
        "Policy you must respect:\n"
        f"- Call only the tools offered to you ({tools}) or complete, escalate, wait.\n"
        f"{at_once}"
        "- Use the arguments prepared for a ready step; change them only if they are clearly wrong.\n"
        "- Call complete only when every step has succeeded.\n"
        "- Call wait with the tool's name when the next step's tool is unavailable.\n"
        "- Call escalate with a reason when you are stuck or something looks wrong: a human takes over."
    )


def remaining_steps(
    snapshot: StateSnapshot,
    workflow: Workflow,
    offered: Sequence[OfferedTool],
    memory: MemoryReader = no_memory,
    versions: dict[str, dict[str, int]] | None = None,
) -> list[dict[str, Any]]:
    """The steps not yet succeeded, in order; a ready one (its needs done) carries its prepared arguments,
    built from shared memory as it is now for a step that reads it (the entities shown beside them, and
    their versions put in ``versions``)."""
    results = snapshot.results()
    names = {t.name for t in offered}
    out = []
    for state in snapshot.steps:
        if state.status is StepStatus.succeeded:
            continue
        step = workflow.step(state.name)
        # A step in flight is not ready again (a fan-out asks while other steps run).
        ready = state.status is StepStatus.pending and all(n in results for n in step.needs)
        item: dict[str, Any] = {
            "step": step.name,
            "tool": step.tool,
            "needs": list(step.needs),
            "status": state.status.value,
            "ready": ready,
            "tool_available": step.tool in names,
        }
        if ready:
            try:
                facts = read(step, snapshot, results, memory)
                if facts.shown:
                    item["memory"] = facts.shown
                    if versions is not None:
                        versions[step.name] = facts.versions
                item["arguments"] = step.build(snapshot.request, results, snapshot.run_id, facts.facts)
            except KeyError as exc:  # an output the template names is missing: say so, let the model judge
                item["arguments_missing"] = str(exc)
        out.append(item)
    return out


def _user_message(
    snapshot: StateSnapshot, remaining: list[dict[str, Any]], results: dict[str, str], room: int = 1
) -> str:
    done = "\n".join(f"- {step}: {text}" for step, text in results.items()) or "- nothing yet"
    failed = "\n".join(f"- {s.name}: {s.error}" for s in snapshot.steps if s.error) or "- nothing"
    return (
        f"Run {snapshot.run_id}, state version {snapshot.version}.\n"
        f"Request (JSON): {_dump(snapshot.request.model_dump())}\n"
        f"Done, with what each step returned:\n{done}\n"
        f"Failed, and why:\n{failed}\n"
        f"{REMAINING_MARKER}\n{_dump(remaining)}\n"
        + (
            "Decide the next action: one call."
            if room <= 1
            else f"Decide the next actions: one call per ready step, at most {room} calls."
        )
    )


def plan_section(plan: str | None, missing: str | None) -> str:
    """What the executor is told of the run's plan: the plan, or why there is none (empty: no planner)."""
    if plan is not None:
        return (
            "\nPlan for this run, written by the planner at its start (follow it; where it differs from the"
            f" policy above, the policy wins):\n{plan}"
        )
    if missing is not None:
        return f"\nNo plan for this run: {missing}. Decide from the workflow and the policy alone."
    return ""


def build_messages(
    snapshot: StateSnapshot,
    workflow: Workflow,
    offered: Sequence[OfferedTool],
    *,
    budget_tokens: int,
    plan: str | None = None,
    plan_missing: str | None = None,
    memory: MemoryReader = no_memory,
) -> Prepared:
    """The messages for ``snapshot``, trimmed to ``budget_tokens`` by the rule in the module docstring.

    ``plan`` (bounded by the planner, never cut here) or ``plan_missing`` (why there is none) ends the
    system message, after the policy, which it may not override. Neither given, the plan the run's
    state carries (``snapshot.plan``) is the one shown."""
    if plan is None and plan_missing is None and snapshot.plan is not None:
        plan = snapshot.plan.plan
        plan_missing = None if plan is not None else snapshot.plan.error or "the planner failed"
    system = {"role": "system", "content": system_message(workflow, offered) + plan_section(plan, plan_missing)}
    versions: dict[str, dict[str, int]] = {}
    remaining = remaining_steps(snapshot, workflow, offered, memory, versions)
    done = {s.name: _dump(s.output) for s in snapshot.steps if s.status is StepStatus.succeeded}
    shown = dict(done)
    room = workflow.room(snapshot) if workflow.max_parallel > 1 else 1

    def messages() -> list[dict[str, Any]]:
        return [system, {"role": "user", "content": _user_message(snapshot, remaining, shown, room)}]

    current = messages()
    level = max((len(t) for t in done.values()), default=0)
    while (excess := (message_tokens(current) - budget_tokens) * CHARS_PER_TOKEN) > 0 and level > MIN_KEPT:
        # Water-filling: lower one level for every result, so the largest are cut first and the
        # smaller ones only once the larger reached their size.
        above = sum(1 for t in done.values() if len(t) >= level) or 1
        level = max(MIN_KEPT, level - max(1, math.ceil(excess / above)))
        shown = {s: _cut(t, level) for s, t in done.items()}
        current = messages()
    truncated = {s: len(t) - level for s, t in done.items() if shown[s] != t}
    return Prepared(current, message_tokens(current), truncated, versions)


def _cut(text: str, level: int) -> str:
    """The first ``level`` characters of ``text``, and a marker saying how many more there were."""
    if len(text) <= level:
        return text
    return f"{text[:level]}…[truncated {len(text) - level} chars]"


# -- the planner's context ----------------------------------------------------------------------------
def planner_messages(
    snapshot: StateSnapshot, workflow: Workflow, offered: Sequence[OfferedTool], *, max_chars: int
) -> list[dict[str, Any]]:
    """What the planner is asked at a run's start: the workflow, its tools and the request; a plan in words."""
    steps = "\n".join(
        f"- {s.name}: tool {s.tool}" + (f", needs {', '.join(s.needs)}" if s.needs else "") for s in workflow.steps
    )
    tools = "\n".join(f"- {t.name}: {t.description or 'no description'}" for t in offered) or "- none available now"
    system = (
        f'You plan one run of the workflow "{workflow.name}"; another model then decides each step following'
        " your plan, one call at a time.\n"
        f"Goal: {workflow.goal}\n"
        f"Steps, in order:\n{steps}\n"
        f"Tools:\n{tools}\n"
        f"Write a short plan in plain text, at most {max_chars} characters: the order of the steps for this"
        " request, what to check in each result, and when to escalate to a human. No tool calls, no code."
    )
    user = f"Run {snapshot.run_id}.\nRequest (JSON): {_dump(snapshot.request.model_dump())}\nWrite the plan."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def bound_plan(text: str, max_chars: int) -> str:
    """The plan as the executor gets it: at most ``max_chars`` characters and a marker of what was cut."""
    return _cut(text.strip(), max_chars)
