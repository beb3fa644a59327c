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
from dataclasses import replace
from typing import Any

from streamagent.processors.decision.arguments import ArgumentCheck, no_check
from streamagent.processors.decision.choice import EntryOf
from streamagent.processors.decision.decider import Decision, context_of
from streamagent.processors.decision.llm.answer import Refused, parse
from streamagent.processors.decision.llm.client import Completion, ModelClient, ModelUnavailable
from streamagent.processors.decision.llm.context import OfferedTool, build_messages, estimate_tokens, message_tokens
from streamagent.processors.decision.llm.judge import judge
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
from streamagent.pricing import cost_usd, parse_prices

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
    ) -> None:
        self.workflows = workflows
        self.available = available
        self.check = check
        self.entry_of = entry_of
        self.client = client or ModelClient(settings, decider=self.name)
        self.rules = RulesDecider(workflows, available, check)
        self.budget = settings.model_context_tokens
        self.prices = parse_prices(settings.model_prices)

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
        if any(s.status is StepStatus.dispatched for s in snapshot.steps):
            return None  # its result is on the way
        try:
            return self._ask(snapshot, workflow)
        except Exception as exc:  # a bug here must not stop every run's decisions: the fallback decides
            log.exception("the llm decider failed", extra={"run_id": snapshot.run_id})
            audit = _Audit(self.client.model, self.client.style, {})
            return self._fallback(snapshot, workflow, f"decider error: {exc!r}", audit, [])

    def offered(self, workflow: Workflow) -> list[OfferedTool]:
        """The workflow's tools the live catalogue shows available, with their announced schemas."""
        out = []
        for name in workflow.tools:
            if not self.available(name):
                continue
            entry = self.entry_of(name)
            out.append(OfferedTool(name, entry.description if entry else "", dict(entry.input_schema) if entry else {}))
        return out

    def _ask(self, snapshot: StateSnapshot, workflow: Workflow) -> Decision | None:
        offered = self.offered(workflow)
        names = {t.name for t in offered}
        prepared = build_messages(snapshot, workflow, offered, budget_tokens=self.budget)
        messages = list(prepared.messages)
        audit = _Audit(self.client.model, self.client.style, prepared.truncated)
        for turn in (1, 2):
            try:
                completion = self.client.complete(messages, offered)
            except ModelUnavailable as exc:
                return self._fallback(snapshot, workflow, f"model unavailable: {exc.reason}", audit, messages)
            audit.add(messages, completion)
            try:
                decision = judge(parse(completion.message), snapshot, workflow, names, self.check, {})
            except Refused as exc:
                audit.refused.append(str(exc))
                if turn == 2:
                    return self._fallback(snapshot, workflow, f"answer refused twice: {exc}", audit, messages)
                messages = messages + _repair(completion, str(exc))
                continue
            return self._finish(decision, snapshot, sorted(names), audit, messages)
        raise AssertionError("unreachable")

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
        return replace(
            decision,
            context=context,
            prompt_tokens=audit.prompt_tokens,
            completion_tokens=audit.completion_tokens,
            cost_usd=cost,
        )

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


def _repair(completion: Completion, error: str) -> list[dict[str, Any]]:
    """The turn that quotes why the answer was refused. A tool call must be answered by a tool message
    with its id (the chat API refuses a conversation that leaves one unanswered)."""
    refused = f"Refused: {error}. Answer again with exactly one call that respects the policy."
    calls = completion.raw.get("tool_calls") or []
    assistant = {"role": "assistant", "content": completion.raw.get("content")}
    if calls:
        assistant["tool_calls"] = calls
        return [assistant] + [{"role": "tool", "tool_call_id": c.get("id", ""), "content": refused} for c in calls]
    return [assistant, {"role": "user", "content": refused}]


class _Audit:
    """What the decision records of its model calls."""

    def __init__(self, model: str, style: str, truncated: dict[str, int]) -> None:
        self.model, self.style, self.truncated = model, style, truncated
        self.answers: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.attempts = 0
        self.latency_s = 0.0
        self.prompt_tokens = self.completion_tokens = 0
        self.estimated = False
        self.fallback: str | None = None
        self.fallback_reason: str | None = None

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
