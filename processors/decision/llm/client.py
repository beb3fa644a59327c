"""One chat completion against an OpenAI-compatible endpoint, retried, or a reason why not.

Retries are ours, not the openai client's (its ``max_retries`` is 0): every attempt is counted in
``streamagent_model_calls_total``, Retry-After is honoured exactly, and giving up yields a reason
the decision records. Retried: 429, 5xx, timeouts, connection errors. Any other 4xx is a request
the endpoint will never take (a wrong model name, a bad key): given up at once.

A call may be given a deadline (the decision's whole time limit): no attempt runs past it (its HTTP
timeout is cut to what is left) and no pause is taken that would end past it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import openai
from streamagent.processors.decision.llm.answer import response_format, tool_specs
from streamagent.processors.decision.llm.context import OfferedTool

from streamagent import model_endpoint, tracing
from streamagent.config import Settings
from streamagent.metrics import MODEL_CALL_SECONDS, MODEL_CALLS

BACKOFF_S = 0.5  # first pause between attempts, doubled each time
BACKOFF_MAX_S = 8.0
# A Retry-After longer than this is not waited for: the decision processor would hold every run's
# decisions meanwhile, and the workflow's fallback serves the run better than the wait.
RETRY_AFTER_MAX_S = 30.0


class ModelUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Completion:
    message: Any  # the openai ChatCompletionMessage
    raw: dict[str, Any]  # the message as the endpoint sent it, for the audit trail
    prompt_tokens: int | None  # None: the endpoint reported no usage
    completion_tokens: int | None
    attempts: int
    latency_s: float


def api_key(settings: Settings, role: str = "executor") -> str:
    if role == "planner" and settings.planner_api_key.get_secret_value():
        return settings.planner_api_key.get_secret_value()
    return model_endpoint.api_key(settings)


def retry_after(response: Any) -> float | None:
    """Seconds the endpoint asked us to wait (``retry-after-ms`` or ``retry-after`` in seconds)."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: rare from model servers; the backoff applies
    return None


class ModelClient:
    def __init__(
        self,
        settings: Settings,
        *,
        decider: str = "llm",
        sleep: Callable[[float], None] = time.sleep,
        role: Literal["executor", "planner"] = "executor",
    ) -> None:
        planner = role == "planner"
        # The planner has its own model and endpoint; what it leaves empty is the executor's.
        self.model = (settings.planner_model if planner else "") or settings.model
        self.style = settings.model_answer_style
        self.tool_choice = settings.model_tool_choice
        self.max_tokens = settings.model_max_tokens if not planner else 0
        self.max_retries = settings.model_max_retries
        self.decider = decider
        self.sleep = sleep
        self.openai = openai.OpenAI(
            # Always given: the openai client would otherwise read OPENAI_BASE_URL itself, past the settings.
            base_url=(settings.planner_base_url if planner else "") or settings.openai_base_url,
            api_key=api_key(settings, role),
            timeout=settings.planner_timeout_s if planner else settings.model_timeout_s,
            max_retries=0,
        )

    def request(self, messages: Sequence[dict[str, Any]], offered: Sequence[OfferedTool]) -> dict[str, Any]:
        """The chat completion's parameters, in the configured answer style."""
        params: dict[str, Any] = {"model": self.model, "messages": list(messages), "temperature": 0}
        if self.max_tokens:
            params["max_tokens"] = self.max_tokens
        if self.style == "tools":
            params["tools"] = tool_specs(offered)
            params["tool_choice"] = self.tool_choice
        else:
            params["response_format"] = response_format(offered, self.style)
        return params

    def complete(
        self, messages: Sequence[dict[str, Any]], offered: Sequence[OfferedTool], *, deadline: float | None = None
    ) -> Completion:
        return self.chat(self.request(messages, offered), deadline=deadline)

    def text(self, messages: Sequence[dict[str, Any]]) -> Completion:
        """A plain answer in words (the planner's): no tools, no response format."""
        return self.chat({"model": self.model, "messages": list(messages), "temperature": 0})

    def chat(self, params: dict[str, Any], *, deadline: float | None = None) -> Completion:
        """``deadline``: a ``time.monotonic()`` instant no attempt may outlast (None: only the timeouts)."""
        # Metrics and an optional GenAI span around the call and its retries (streamagent.tracing).
        with (
            MODEL_CALL_SECONDS.labels(self.decider).time(),
            tracing.model_call("openai", self.model, self.decider) as span,
        ):
            completion = self._chat(params, deadline=deadline)
            tracing.model_answered(span, completion)
            return completion

    def _chat(self, params: dict[str, Any], *, deadline: float | None = None) -> Completion:
        started = time.monotonic()
        timeout = float(self.openai.timeout)  # type: ignore[arg-type]
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            left = timeout if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise ModelUnavailable(f"the decision's time limit was spent, {attempt} attempt(s)")
            try:
                response = self.openai.chat.completions.create(**params, timeout=min(timeout, left))
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status != 429 and status < 500:
                    MODEL_CALLS.labels(self.decider, "refused").inc()
                    raise ModelUnavailable(f"the endpoint refused the request: HTTP {status}: {exc.message}") from None
                reason, wait = f"HTTP {status}", retry_after(exc.response)
            except openai.APITimeoutError:
                if left < timeout:
                    MODEL_CALLS.labels(self.decider, "error").inc()
                    raise ModelUnavailable(
                        f"no answer within the decision's time limit ({left:.1f}s left of it), {attempt + 1} attempt(s)"
                    ) from None
                reason = f"no answer within {self.openai.timeout}s"
            except openai.APIConnectionError as exc:
                reason = f"cannot connect to {self.openai.base_url}: {exc.__cause__ or exc}"
            else:
                MODEL_CALLS.labels(self.decider, "answered").inc()
                if not response.choices:
                    raise ModelUnavailable("the endpoint answered no choices")
                message = response.choices[0].message
                usage = response.usage
                return Completion(
                    message=message,
                    raw=message.model_dump(exclude_none=True, mode="json"),
                    prompt_tokens=usage.prompt_tokens if usage else None,
                    completion_tokens=usage.completion_tokens if usage else None,
                    attempts=attempt + 1,
                    latency_s=time.monotonic() - started,
                )
            MODEL_CALLS.labels(self.decider, "error").inc()
            if attempt == self.max_retries:
                raise ModelUnavailable(f"{reason}, {attempt + 1} attempt(s)")
            if wait is not None and wait > RETRY_AFTER_MAX_S:
                raise ModelUnavailable(f"{reason}, Retry-After {wait:.0f}s is longer than {RETRY_AFTER_MAX_S:.0f}s")
            pause = max(wait or 0.0, min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S))
            if deadline is not None and time.monotonic() + pause >= deadline:
                # Waiting would spend what is left of the decision's time: the fallback decides now.
                raise ModelUnavailable(f"{reason}, {attempt + 1} attempt(s); no time left in the decision to retry")
            self.sleep(pause)
        raise AssertionError("unreachable")
