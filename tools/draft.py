"""The welcome email, drafted by a model from the request and the enrichment; the workflow's template
when no model is configured, the model cannot be reached, or its draft fails the checks (tools/drafting.py).

A tool like any other (its own consumer group, ledger and retries): the decision layer only decides that
the mail is drafted, and this tool asks the model. What the call spent and the prompt and answer go on
the ToolResult beside the output (``CallContext.model_use``): the run's budget counts them and its
timeline shows them. The output says who wrote the mail (``drafted_by``) and, for the template, why.

The call is checked against the run's model budget before it is made (``CallContext.budget``, from the
signed command: what the workflow's per-run caps and the policy's budgets leave): a prompt and the longest
answer allowed (MAX_COMPLETION_TOKENS) that would not fit send the template, with the budget as the reason.

A model that fails is not retried by the runner: the template is a good mail, and a run should not wait
on, or pay again for, a nicer one. The endpoint's own retries (STREAMAGENT_MODEL_MAX_RETRIES) apply.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel
from streamagent.tools.drafting import (
    MAX_COMPLETION_TOKENS,
    Draft,
    Facts,
    UnreadableAnswer,
    messages,
    problems,
    prompt_tokens,
    read_answer,
)
from streamagent.tools.sdk import CallContext, Tool

from streamagent import model_endpoint
from streamagent.config import Settings, get_settings
from streamagent.pricing import cost_usd, parse_prices

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 4  # a token count for an endpoint that reports no usage


class DraftInput(Facts):
    template_subject: str
    template_body: str


class Drafted(BaseModel):
    subject: str
    body: str
    drafted_by: Literal["model", "template"]
    fallback_reason: str | None = None  # why the template was used
    model: str | None = None


class DraftEmail(Tool[DraftInput, Drafted]):
    name = "draft"
    description = "Draft the welcome email to the client's contact from the request and the enrichment"
    input_model = DraftInput
    output_model = Drafted

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._client: Any = None  # one openai client (and its connection pool) for the process's calls

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = get_settings()
        return self._settings

    def call_timeout(self, default_s: float) -> float:
        # A model writes for seconds; the tool's HTTP timeout (for SaaS APIs) would cut it off.
        return max(default_s, self.settings.model_timeout_s * (self.settings.model_max_retries + 1))

    async def call(self, args: DraftInput, ctx: CallContext) -> Drafted:
        settings = self.settings
        if not model_endpoint.configured(settings):
            return self._template(args, ctx, "no model configured (OPENAI_BASE_URL is empty)")
        # Imported here: every CLI command lists the tools, and the openai client takes seconds to import.
        import openai

        model = settings.draft_model or settings.model
        sent = messages(Facts.model_validate(args.model_dump(include=set(Facts.model_fields))))
        prices = parse_prices(settings.model_prices)
        # Checked before the call, as the decider checks its own: the prompt and the longest answer allowed.
        need = prompt_tokens(sent) + MAX_COMPLETION_TOKENS
        over = ctx.budget.refuses(
            ctx.model_use.prompt_tokens + ctx.model_use.completion_tokens + need,
            ctx.model_use.cost_usd + cost_usd(prices, model, prompt_tokens(sent), MAX_COMPLETION_TOKENS),
        )
        if over is not None:
            log.warning("draft: model not asked: %s", over, extra={"run_id": ctx.run_id})
            return self._template(args, ctx, over, {"model": model, "messages": sent})
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                base_url=settings.openai_base_url,
                api_key=model_endpoint.api_key(settings),
                timeout=settings.model_timeout_s,
                max_retries=settings.model_max_retries,
            )
        try:
            response = await self._client.chat.completions.create(
                model=model, messages=sent, temperature=0.3, max_tokens=MAX_COMPLETION_TOKENS
            )
        except openai.APIError as exc:
            reason = f"the model could not be asked: {type(exc).__name__}: {exc}"
            log.warning("draft: %s", reason, extra={"run_id": ctx.run_id})
            return self._template(args, ctx, reason, {"model": model, "messages": sent})
        answer = response.choices[0].message.content if response.choices else None
        usage = response.usage
        prompt = usage.prompt_tokens if usage else sum(len(str(m["content"])) for m in sent) // CHARS_PER_TOKEN
        completion = usage.completion_tokens if usage else len(answer or "") // CHARS_PER_TOKEN
        context: dict[str, Any] = {"model": model, "messages": sent, "answer": answer, "usage_reported": bool(usage)}
        cost = cost_usd(prices, model, prompt, completion)
        ctx.model_use.add(model, prompt, completion, cost, context)
        try:
            draft = read_answer(answer)
        except UnreadableAnswer as exc:
            return self._template(args, ctx, f"the model's answer was refused: {exc}", context)
        wrong = problems(draft, args)
        if wrong:
            return self._template(args, ctx, "the model's draft was refused: " + "; ".join(wrong), context)
        ctx.model_use.context = {**context, "drafted_by": "model"}
        return Drafted(subject=draft.subject.strip(), body=draft.body.strip(), drafted_by="model", model=model)

    def _template(
        self, args: DraftInput, ctx: CallContext, reason: str, context: dict[str, Any] | None = None
    ) -> Drafted:
        ctx.model_use.describe({**(context or {}), "drafted_by": "template", "fallback_reason": reason})
        return Drafted(
            subject=args.template_subject, body=args.template_body, drafted_by="template", fallback_reason=reason
        )


__all__ = ["Draft", "DraftEmail", "DraftInput", "Drafted"]
