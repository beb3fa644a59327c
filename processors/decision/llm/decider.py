"""The LLM decider: the model picks the next step; code prepares, checks, and falls back.

What stays code (no model call): a run that is over (compensation), past its deadline, or with a
failed step is decided by the rules, as the workflow says; a run with a command in flight waits for
its result. Everything else asks the model, at most twice (the answer, then one repair turn quoting
why it was refused). A refused repair, or the model unreachable after its retries, hands the run to
the workflow's fallback (``rules`` or ``escalate``) with the reason. A decision is never a crash.

The decision's context records the exact messages sent and the raw answers, the tokens (from the
endpoint's usage, or counted and flagged ``tokens_estimated``) and the cost from the price table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import psycopg
from streamagent.processors.decision.arguments import ArgumentCheck, no_check
from streamagent.processors.decision.choice import EntryOf
from streamagent.processors.decision.decider import Decision, context_of
from streamagent.processors.decision.llm.answer import Refused, parse, parse_calls
from streamagent.processors.decision.llm.budget import Caps, Spending
from streamagent.processors.decision.llm.client import Completion, ModelClient, ModelUnavailable
from streamagent.processors.decision.llm.context import (
    PSEUDO_TOOLS,
    OfferedTool,
    build_messages,
    estimate_tokens,
    message_tokens,
)
from streamagent.processors.decision.llm.judge import judge
from streamagent.processors.decision.llm.ledger import PlanRecord, RunLedger
from streamagent.processors.decision.llm.planner import Planner
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.workflow import (
    ToolAvailability,
    UnknownWorkflow,
    Workflow,
    Workflows,
    every_tool_available,
    lookup,
)

from streamagent.catalogue import ToolEntry
from streamagent.config import Settings
from streamagent.events import DecisionAction, RunStatus, StateSnapshot, StepStatus
from streamagent.memory import MemoryReader, no_memory
from streamagent.pricing import Prices, cost_usd, parse_prices

log = logging.getLogger(__name__)


def _no_entry(_name: str) -> ToolEntry | None:
    return None


class LlmDecider:
    name = "llm"

    def __init__(
        self,
        settings: Settings,
        workflows: Workflows,
        available: ToolAvailability = every_tool_available,
        check: ArgumentCheck = no_check,
        entry_of: EntryOf = _no_entry,
        *,
        client: ModelClient | None = None,
        planner_client: ModelClient | None = None,
        ledger: RunLedger | None = None,
        memory: MemoryReader = no_memory,
    ) -> None:
        self.workflows = workflows
        self.available = available
        self.check = check
        self.entry_of = entry_of
        self.client = client or ModelClient(settings, decider=self.name)
        # The rules decide what the workflow decides (failures, the end, the fallback), from shared memory too.
        self.rules = RulesDecider(workflows, available, check, memory)
        self.memory = memory
        self.budget = settings.model_context_tokens
        self.prices = parse_prices(settings.model_prices)
        self.settings = settings
        # The run's spending and plan live in the decision layer's tables; read only by workflows with a
        # planner or a cap (the connection opens on first use).
        self.ledger = ledger or RunLedger(settings.database_url)
        self.planner = Planner(settings, self.ledger, self.prices, client=planner_client)

    def decide(self, snapshot: StateSnapshot) -> Decision | None:
        try:
            workflow = lookup(self.workflows, snapshot.request.workflow)
        except UnknownWorkflow:
            return self.rules.decide(snapshot)
        if (
            snapshot.status is not RunStatus.running
            or snapshot.deadline_exceeded
            or any(s.status is StepStatus.failed for s in snapshot.steps)
        ):
            return self.rules.decide(snapshot)  # the workflow's own policy: no judgement to make
        if any(s.status is StepStatus.dispatched for s in snapshot.steps) and not (
            workflow.max_parallel > 1 and workflow.room(snapshot) and workflow.ready(snapshot)
        ):
            return None  # its result is on the way (a fan-out asks only while a ready step has room)
        # Outside the catch-all below: PostgreSQL down is an outage of the batch (retried whole), not a
        # reason to decide the run differently.
        audit = self._prepare(snapshot, workflow)
        try:
            return self._ask(snapshot, workflow, audit)
        except psycopg.Error:
            raise
        except Exception as exc:  # a bug here must not stop every run's decisions: the fallback decides
            log.exception("the llm decider failed", extra={"run_id": snapshot.run_id})
            return self._fallback(snapshot, workflow, f"decider error: {exc!r}", audit, [])

    def _prepare(self, snapshot: StateSnapshot, workflow: Workflow) -> _Audit:
        """The run's plan and spending before any call: what the workflow's planner and caps need."""
        audit = _Audit(self.client.model, self.client.style, {})
        audit.caps = Caps.of(workflow, self.settings)
        audit.planned = workflow.planner if workflow.planner is not None else self.settings.planner
        folded = snapshot.plan if audit.planned else None
        if folded is not None:
            # The run's state carries its plan: the decision that recorded it (and paid for it) is folded
            # already, so the table is not read for it and this decision carries nothing.
            audit.plan = PlanRecord(
                run_id=snapshot.run_id,
                based_on_version=max(1, folded.based_on_version),
                plan=folded.plan,
                error=folded.error,
                model=folded.model,
            )
        if not ((audit.planned and folded is None) or audit.caps.active):
            return audit
        ledger = self.ledger.spent(snapshot.run_id)
        # The ledger has the run's decisions only; what its tools spent on models is folded
        # apart in its state, so the sum counts each once.
        audit.spent = ledger.spent + Spending(snapshot.tool_tokens, round(snapshot.tool_cost_usd, 6))
        audit.last_version = ledger.last_version
        if audit.planned and folded is None:
            # Not folded yet (the run's first decisions): the planner's table, written before any use.
            audit.plan = self.ledger.plan(snapshot.run_id)
            # A plan's cost is carried by the run's first decision recorded from the version it was made
            # on: made at v and the decision of v lost in a crash, the decision made again for v carries it.
            audit.charged = audit.plan is not None and audit.plan.based_on_version > ledger.last_version
        return audit

    def offered(self, workflow: Workflow) -> list[OfferedTool]:
        """The workflow's tools the live catalogue shows available, with their announced schemas."""
        out = []
        for name in workflow.tools:
            if not self.available(name):
                continue
            entry = self.entry_of(name)
            out.append(OfferedTool(name, entry.description if entry else "", dict(entry.input_schema) if entry else {}))
        return out

    def _messages(
        self, snapshot: StateSnapshot, workflow: Workflow, offered: list[OfferedTool], audit: _Audit
    ) -> list[dict[str, Any]]:
        plan = audit.plan
        missing = None
        if audit.planned and plan is None:
            missing = "the planner has not written it yet"
        elif plan is not None and plan.plan is None:
            missing = plan.error or "the planner failed"
        prepared = build_messages(
            snapshot,
            workflow,
            offered,
            budget_tokens=self.budget,
            plan=plan.plan if plan is not None else None,
            plan_missing=missing,
            memory=self.memory,
        )
        audit.truncated = prepared.truncated
        audit.memory = prepared.memory
        return list(prepared.messages)

    def _estimate(self, messages: list[dict[str, Any]], extra_tokens: int = 0) -> Spending:
        """The next executor call's prompt, counted with the context builder's rule, and its price."""
        tokens = message_tokens(messages) + extra_tokens
        return Spending(tokens, cost_usd(self.prices, self.client.model, tokens, 0))

    def _over_cap(
        self, snapshot: StateSnapshot, offered: list[str], audit: _Audit, estimate: Spending, messages: list[Any]
    ) -> Decision | None:
        """An escalation, with no call, when ``estimate`` more would break one of the run's caps."""
        if not audit.caps.active:
            return None
        spent = audit.spent + audit.spending(self.prices)
        why = audit.caps.exceeded(spent, estimate)
        if why is None:
            return None
        log.warning("model call not made: %s", why, extra={"run_id": snapshot.run_id})
        audit.budget = {
            "max_tokens_per_run": audit.caps.max_tokens,
            "max_cost_usd_per_run": audit.caps.max_cost_usd,
            "spent_tokens": spent.tokens,
            "spent_cost_usd": spent.cost_usd,
            "tool_tokens": snapshot.tool_tokens,  # of spent_tokens: what the run's tools spent on models
            "tool_cost_usd": snapshot.tool_cost_usd,
            "estimate_tokens": estimate.tokens,
            "estimate_cost_usd": estimate.cost_usd,
            "exceeded": why,
        }
        return self._finish(Decision(DecisionAction.escalate, why), snapshot, offered, audit, messages)

    def _ask(self, snapshot: StateSnapshot, workflow: Workflow, audit: _Audit) -> Decision | None:
        offered = self.offered(workflow)
        if workflow.max_parallel > 1:
            offered = _say_ready(offered, workflow, snapshot)
        names = {t.name for t in offered}
        planning = audit.planned and audit.plan is None
        planner_messages = self.planner.messages(snapshot, workflow, offered) if planning else []
        messages = self._messages(snapshot, workflow, offered, audit)
        estimate = self._estimate(messages)
        if planning:
            # The planner's call, and the executor's prompt grown by a plan of the longest kept length.
            longest = estimate_tokens("x" * self.planner.max_chars)
            estimate = self._estimate(messages, longest) + self.planner.estimate(planner_messages)
        over = self._over_cap(snapshot, sorted(names), audit, estimate, messages)
        if over is not None:
            return over
        if planning:
            audit.plan = self.planner.make(snapshot, planner_messages)
            # Ours, or the one another instance stored first (a rebalance): carried by the same rule.
            audit.charged = audit.plan.based_on_version > audit.last_version
            messages = self._messages(snapshot, workflow, offered, audit)
        # One time limit for the decision's calls, the repair turn included (the plan had its own): past
        # it the fallback decides, however many retries were left.
        deadline = time.monotonic() + self.settings.model_decision_timeout_s
        taken: dict[str, Decision] = {}  # a fan-out's calls taken so far, by step (kept across the repair)
        for turn in (1, 2):
            if turn == 2:
                # The repair turn is a call of its own: it too must fit the run's caps.
                over = self._over_cap(snapshot, sorted(names), audit, self._estimate(messages), messages)
                if over is not None:
                    return over
            try:
                completion = self.client.complete(messages, offered, deadline=deadline)
            except ModelUnavailable as exc:
                return self._fallback(snapshot, workflow, f"model unavailable: {exc.reason}", audit, messages)
            audit.add(messages, completion)
            try:
                if workflow.max_parallel > 1:
                    decision, refused = self._calls(completion, snapshot, workflow, names, audit, taken)
                else:
                    single = judge(parse(completion.message), snapshot, workflow, names, self.check, {})
                    decision, refused = self._remember(single, audit), []
            except Refused as exc:
                decision, refused = None, [str(exc)]
            if not refused and decision is not None:
                return self._finish(decision, snapshot, sorted(names), audit, messages)
            audit.refused += refused
            if turn == 2:
                if taken:  # the calls that held run; the refused ones fall back
                    return self._partial(snapshot, workflow, taken, "; ".join(refused), audit, messages)
                why = f"answer refused twice: {'; '.join(refused)}"
                return self._fallback(snapshot, workflow, why, audit, messages)
            fan_out = sorted(taken) if workflow.max_parallel > 1 else None
            messages = messages + _repair(completion, "; ".join(refused), fan_out)
        raise AssertionError("unreachable")

    @staticmethod
    def _remember(decision: Decision, audit: _Audit) -> Decision:
        if decision.step in audit.memory:  # the versions its prepared arguments showed the model
            decision = replace(decision, memory=audit.memory[decision.step])
        return decision

    def _calls(
        self,
        completion: Completion,
        snapshot: StateSnapshot,
        workflow: Workflow,
        names: set[str],
        audit: _Audit,
        taken: dict[str, Decision],
    ) -> tuple[Decision | None, list[str]]:
        """A fan-out's answer, each call judged on its own: the dispatches taken (added to ``taken``, with
        those of an earlier turn) as one decision, and why each other call was refused. complete,
        escalate and wait stand only alone."""
        calls = parse_calls(completion.message)
        refused: list[str] = []
        room = workflow.room(snapshot)
        for call in calls:
            if isinstance(call, Refused):
                refused.append(str(call))
                continue
            if call.tool in PSEUDO_TOOLS:
                if len(calls) == 1 and not taken:
                    return judge(call, snapshot, workflow, names, self.check, {}), []
                refused.append(f"{call.tool} must be the only call of an answer")
                continue
            if len(taken) >= room:
                refused.append(f"{call.tool}: at most {room} step(s) may start now")
                continue
            try:
                decision = self._remember(judge(call, snapshot, workflow, names, self.check, {}, taken), audit)
            except Refused as exc:
                refused.append(str(exc))
                continue
            assert decision.step is not None
            taken[decision.step] = decision
        return _together(list(taken.values())), refused

    def _partial(
        self,
        snapshot: StateSnapshot,
        workflow: Workflow,
        taken: dict[str, Decision],
        why: str,
        audit: _Audit,
        messages: list[dict[str, Any]],
    ) -> Decision:
        """Some calls held and others were refused twice: the held ones run, and the refused steps fall back
        to the workflow's fallback (the rules start what is ready beside them; escalate: they are left for
        the next decision, which asks again)."""
        audit.fallback, audit.fallback_reason = workflow.fallback, f"calls refused twice: {why}"
        dispatches = list(taken.values())
        if workflow.fallback == "rules":
            ruled = self.rules.decide(snapshot)
            room = workflow.room(snapshot) - len(dispatches)
            more = [d for d in (ruled.dispatches() if ruled is not None else ()) if d.step not in taken][: max(0, room)]
            dispatches += [replace(d, reason=f"fallback to rules ({why}): {d.reason}", parallel=()) for d in more]
        decision = _together(dispatches)
        assert decision is not None
        offered = sorted(t.name for t in self.offered(workflow))
        return self._finish(decision, snapshot, offered, audit, messages)

    def _finish(
        self,
        decision: Decision,
        snapshot: StateSnapshot,
        offered: list[str],
        audit: _Audit,
        messages: list[dict[str, Any]],
    ) -> Decision:
        context = {**context_of(snapshot, offered), **audit.record(messages)}
        cost = cost_usd(self.prices, audit.model, audit.prompt_tokens, audit.completion_tokens)
        prompt, completion = audit.prompt_tokens, audit.completion_tokens
        if audit.charged and audit.plan is not None:
            # The run's first decision carries its plan's tokens and cost: run totals include the planner.
            prompt += audit.plan.prompt_tokens
            completion += audit.plan.completion_tokens
            cost = round(cost + audit.plan.cost_usd, 6)
        return replace(decision, context=context, prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost)

    def _fallback(
        self, snapshot: StateSnapshot, workflow: Workflow, why: str, audit: _Audit, messages: list[dict[str, Any]]
    ) -> Decision | None:
        log.warning("model decision failed, workflow fallback %s: %s", workflow.fallback, why)
        audit.fallback, audit.fallback_reason = workflow.fallback, why
        offered = sorted(t.name for t in self.offered(workflow))
        if workflow.fallback == "escalate":
            decision = Decision(DecisionAction.escalate, f"{why}; escalated (workflow fallback)")
        else:
            ruled = self.rules.decide(snapshot)
            if ruled is None:
                return None
            decision = replace(ruled, reason=f"fallback to rules ({why}): {ruled.reason}")
        return self._finish(decision, snapshot, offered, audit, messages)


def _say_ready(offered: list[OfferedTool], workflow: Workflow, snapshot: StateSnapshot) -> list[OfferedTool]:
    """A fan-out's offered tools, each saying which of its steps may start now (the model calls several)."""
    ready: dict[str, list[str]] = {}
    for step in workflow.ready(snapshot):
        ready.setdefault(step.tool, []).append(step.name)
    out = []
    for tool in offered:
        steps = ready.get(tool.name)
        note = f"Ready now: step {', '.join(steps)}." if steps else "No step of this tool is ready now."
        out.append(replace(tool, description=f"{note} {tool.description}".strip()))
    return out


def _together(dispatches: list[Decision]) -> Decision | None:
    """The model's dispatches as one decision: the first, with the others started beside it."""
    if not dispatches:
        return None
    first, *more = dispatches
    if not more:
        return first
    names = ", ".join(d.step or "" for d in dispatches)
    return replace(first, reason=f"{names} are the next steps (model)", parallel=tuple(more))


def _repair(completion: Completion, error: str, accepted: list[str] | None = None) -> list[dict[str, Any]]:
    """The turn that quotes why the answer was refused. A tool call must be answered by a tool message
    with its id (the chat API refuses a conversation that leaves one unanswered). ``accepted``: a fan-out's
    steps whose calls held (they run; the model answers again only for the others)."""
    if accepted:
        refused = (
            f"Refused: {error}. Accepted: the calls for {', '.join(accepted)}; they will run. Answer again with"
            " the calls for the other ready steps only, respecting the policy."
        )
    elif accepted is not None:
        refused = f"Refused: {error}. Answer again with the calls for the ready steps, respecting the policy."
    else:
        refused = f"Refused: {error}. Answer again with exactly one call that respects the policy."
    calls = completion.raw.get("tool_calls") or []
    # Content "" rather than null beside tool calls: llama-cpp-python's server refuses a null content.
    assistant = {"role": "assistant", "content": completion.raw.get("content") or ""}
    if calls:
        assistant["tool_calls"] = calls
        return [assistant] + [{"role": "tool", "tool_call_id": c.get("id", ""), "content": refused} for c in calls]
    return [assistant, {"role": "user", "content": refused}]


class _Audit:
    """What the decision records of its model calls."""

    def __init__(self, model: str, style: str, truncated: dict[str, int]) -> None:
        self.model, self.style, self.truncated = model, style, truncated
        self.memory: dict[str, dict[str, int]] = {}  # step -> memory versions the prompt showed
        self.answers: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.attempts = 0
        self.latency_s = 0.0
        self.prompt_tokens = self.completion_tokens = 0
        self.estimated = False
        self.fallback: str | None = None
        self.fallback_reason: str | None = None
        # The run's plan and caps (set by LlmDecider._prepare).
        self.caps = Caps()
        self.planned = False
        self.plan: PlanRecord | None = None
        self.charged = False  # this decision carries the plan's tokens and cost
        self.spent = Spending()  # what the run's recorded decisions and its tools' model calls spent
        self.last_version = 0  # the run's latest state version with a recorded decision
        self.budget: dict[str, Any] | None = None  # set when a cap stopped a call

    def spending(self, prices: Prices) -> Spending:
        """What this decision spent so far: its calls, and its plan when it carries it."""
        own = Spending(
            self.prompt_tokens + self.completion_tokens,
            cost_usd(prices, self.model, self.prompt_tokens, self.completion_tokens),
        )
        return own + self.plan.spending if self.charged and self.plan is not None else own

    def add(self, messages: list[dict[str, Any]], completion: Completion) -> None:
        self.answers.append(completion.raw)
        self.attempts += completion.attempts
        self.latency_s += completion.latency_s
        if completion.prompt_tokens is None or completion.completion_tokens is None:
            # No usage from the endpoint: counted with the context builder's rule, and said so.
            self.estimated = True
            self.prompt_tokens += message_tokens(messages)
            self.completion_tokens += estimate_tokens(str(completion.raw))
        else:
            self.prompt_tokens += completion.prompt_tokens
            self.completion_tokens += completion.completion_tokens

    def record(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        out = self._calls(messages)
        if self.planned:
            out["plan"] = self._plan()
        if self.budget is not None:
            out["budget"] = self.budget
        return out

    def _plan(self) -> dict[str, Any]:
        """The run's plan as this decision saw it; the decision that carries its cost holds all of it."""
        plan = self.plan
        if plan is None:
            return {"plan": None, "error": "the planner has not written it yet", "carried": False}
        out: dict[str, Any] = {
            "plan": plan.plan,
            "error": plan.error,
            "model": plan.model,
            "based_on_version": plan.based_on_version,
            "carried": self.charged,
        }
        if self.charged:
            out.update(
                prompt_tokens=plan.prompt_tokens,
                completion_tokens=plan.completion_tokens,
                cost_usd=plan.cost_usd,
                **plan.audit,
            )
        return out

    def _calls(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model,
            "answer_style": self.style,
            "messages": messages,
            "answers": self.answers,
            "model_calls": len(self.answers),
            "http_attempts": self.attempts,
            "latency_ms": round(self.latency_s * 1000),
            "refused": self.refused,
            "truncated": self.truncated,
            "tokens_estimated": self.estimated,
            "fallback": self.fallback,
            "fallback_reason": self.fallback_reason,
        }
