"""What ``streamagent show`` prints: a run's timeline, what each decision cost, and what a model saw.

A model decision's ``DecisionRecorded`` event carries the exact chat messages sent and what the model
answered in its ``context`` (written by the decider), and a model-backed tool's ``ToolResult`` the same in
its ``model_context``; this module only reads them back. The context is
read through a lenient pydantic model so that an event written by an older or newer decider (other
keys, a message without content) still prints instead of failing the command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from streamagent.console.tables import format_cost, has_costs
from streamagent.events import RunPlan
from streamagent.processors.projection.processor import RULES_DECIDER
from streamagent.processors.projection.queries import RunRow, TimelineEntry

# Without --full a message or an answer is cut at this many characters and this many lines: enough
# to recognise the prompt and the decision, short enough that a run of ten decisions stays readable.
TRIM_CHARS = 600
TRIM_LINES = 12
_INDENT = " " * 16  # under the summary column of a timeline line


class ChatMessage(BaseModel):
    """One chat message as sent to an OpenAI-compatible endpoint (role, content, maybe tool calls)."""

    model_config = ConfigDict(extra="allow")

    role: str = "?"
    content: Any = None


class ModelContext(BaseModel):
    """The parts of a decision's context ``show --context`` knows how to lay out; the rest is listed."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = []
    answer: Any = None
    answers: list[Any] = []


class DecisionCost(BaseModel):
    """What one decision cost, from its event payload."""

    model_config = ConfigDict(extra="ignore")

    decider: str = RULES_DECIDER
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    context: dict[str, Any] = {}

    @property
    def estimated(self) -> bool:
        return self.context.get("tokens_estimated") is True

    @property
    def by_model(self) -> bool:
        return self.decider != RULES_DECIDER or "messages" in self.context

    def note(self) -> str:
        """`` · 412+38 tokens $0.0006`` (``~`` when estimated), or nothing for a decision that cost nothing."""
        if not (self.prompt_tokens or self.completion_tokens or self.cost_usd):
            return ""
        tokens = f"{'~' if self.estimated else ''}{self.prompt_tokens}+{self.completion_tokens} tokens"
        return f" · {tokens} {format_cost(self.cost_usd)}"


def tool_model_cost(payload: Mapping[str, Any]) -> DecisionCost | None:
    """A ToolResult's model use (a model-backed tool such as ``draft``), laid out like a decision's:
    its tokens, cost, and the prompt and answer; None for a tool that asked no model."""
    context = payload.get("model_context")
    if not isinstance(context, dict) or not context:
        return None
    try:
        return DecisionCost.model_validate({**payload, "decider": f"tool {payload.get('tool')}", "context": context})
    except ValidationError:
        return None


def trim(text: str, full: bool) -> str:
    """``text``, or its start with a marker saying how much was left out (``--full`` shows all)."""
    if full:
        return text
    lines = text.splitlines()
    cut = "\n".join(lines[:TRIM_LINES])
    if len(cut) > TRIM_CHARS:
        cut = cut[:TRIM_CHARS]
    left = len(text) - len(cut)
    if left <= 0:
        return text
    return f"{cut.rstrip()} … [{left} more chars; --full shows all]"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and "text" in p for p in value):
        return "\n".join(str(p["text"]) for p in value)  # content given as parts: their text
    return json.dumps(value, sort_keys=True, default=str)


def _labelled(label: str, text: str) -> list[str]:
    first, *rest = text.splitlines() or [""]
    return [f"{_INDENT}{label}: {first}", *(f"{_INDENT}  {line}" for line in rest)]


def context_lines(context: Mapping[str, Any], full: bool = False) -> list[str]:
    """The messages a model saw and what it answered, one block per message, then any other key."""
    try:
        parsed = ModelContext.model_validate(context)
    except ValidationError:  # a shape this version does not know: show it as it is
        return _labelled("context", trim(json.dumps(context, sort_keys=True, default=str), full))
    lines: list[str] = []
    for message in parsed.messages:
        extra = dict(message.model_extra or {})
        body = _text(message.content) if message.content is not None else ""
        if extra.get("tool_calls"):
            body = (body + "\n" if body else "") + "tool_calls: " + _text(extra.pop("tool_calls"))
        label = message.role + (f" ({extra['name']})" if isinstance(extra.get("name"), str) else "")
        lines += _labelled(label, trim(body, full))
    answers = [*parsed.answers, *([parsed.answer] if parsed.answer is not None else [])]
    for i, answer in enumerate(answers, 1):
        label = "answer" if len(answers) == 1 else f"answer {i}/{len(answers)}"
        lines += _labelled(label, trim(_text(answer), full))
    for key, value in (parsed.model_extra or {}).items():
        lines += _labelled(key, trim(_text(value), full))
    return lines


def plan_of(entries: Sequence[TimelineEntry]) -> RunPlan | None:
    """The run's plan as its state folds it: from the first decision that recorded one."""
    for e in entries:
        context = e.payload.get("context")
        if e.type == "DecisionRecorded" and isinstance(context, dict):
            plan = RunPlan.of_context(context, str(e.payload.get("decision_id") or ""))
            if plan is not None:
                return plan
    return None


def plan_lines(plan: RunPlan, full: bool = False) -> list[str]:
    """``plan (model, made on state v1): ...``, or why the run has none."""
    head = f"plan ({plan.model}, made on state v{plan.based_on_version})"
    if plan.plan is None:
        return [f"{head}: none, {plan.error}"]
    first, *rest = trim(plan.plan, full).splitlines() or [""]
    return [f"{head}: {first}", *(f"  {line}" for line in rest)]


def totals_line(row: RunRow) -> str:
    """The run's tokens, cost and model decisions, as summed by the projection."""
    estimated = f" (estimated in {row.estimated_decisions})" if row.estimated_decisions else ""
    return (
        f"total: {row.model_decisions} model decision(s), {row.prompt_tokens:,} prompt"
        f" + {row.completion_tokens:,} completion tokens{estimated}, {format_cost(row.cost_usd)}"
    )


def family_lines(row: RunRow, children: Sequence[RunRow]) -> list[str]:
    """A child run's parent, and a parent's children with their status (child workflows)."""
    lines = [f"child of {row.parent_run_id} (step {row.parent_step})"] if row.parent_run_id else []
    if children:
        lines.append("children:")
        lines += [f"  {c.run_id}  step {c.parent_step}  {c.workflow or '?'}  status={c.status}" for c in children]
    return lines


def print_timeline(
    row: RunRow,
    entries: Sequence[TimelineEntry],
    steps_of: Mapping[str, int],
    *,
    context: bool = False,
    full: bool = False,
    children: Sequence[RunRow] = (),
) -> None:
    total = steps_of.get(row.workflow or "", "?")
    print(f"run {row.run_id}  {row.company_name or '?'}  status={row.status}  steps done={row.steps_done}/{total}")
    if row.reason:
        print(f"reason: {row.reason}")
    for line in family_lines(row, children):
        print(line)
    plan = plan_of(entries)
    if plan is not None:
        print("\n".join(plan_lines(plan, full)))
    start = entries[0].occurred_at if entries else None
    for e in entries:
        offset = (e.occurred_at - start).total_seconds() * 1000 if start else 0
        note = ""
        cost: DecisionCost | None = None
        if e.type == "DecisionRecorded":
            try:
                cost = DecisionCost.model_validate(e.payload)
            except ValidationError:  # not worth failing the timeline over: print the line without it
                cost = None
            note = cost.note() if cost else ""
        elif e.type == "ToolResult":
            cost = tool_model_cost(e.payload)
            note = cost.note() if cost else ""
        print(f"  +{offset:8.0f} ms  {e.type:<20} {e.step or '':<7} {e.summary}{note}")
        if context and cost is not None and cost.by_model:
            for line in context_lines(cost.context, full):
                print(line)
    if has_costs(row):  # a run decided by the rules alone prints as it always did
        print(totals_line(row))
