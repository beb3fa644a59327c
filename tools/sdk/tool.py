"""What a tool author writes: a name, an input and output model, and one async call.

A tool describes itself by its class attributes; ``declaration()`` turns them into the announcement
the runner publishes on the registry topic (the JSON Schemas derived from the models, never written
by hand), and the live catalogue (``streamagent.catalogue``) is built from those announcements.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from streamagent.tools.sdk.errors import PermanentError, RetryableError
from streamagent.tools.sdk.retry import RetryPolicy
from streamagent.tools.sdk.transport import DIRECT_KWARGS, AiohttpTransport

from streamagent.catalogue import Announcement

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)


@dataclass
class ModelUse:
    """What a tool's model calls spent and saw, summed over a command's attempts (a failed attempt's
    tokens were paid for too). The runner puts it on the ToolResult, apart from the output."""

    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    context: dict[str, Any] = field(default_factory=dict)

    def add(
        self, model: str, prompt_tokens: int, completion_tokens: int, cost_usd: float, context: dict[str, Any]
    ) -> None:
        self.model = model
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost_usd = round(self.cost_usd + cost_usd, 6)
        self.context = context  # the last call's: what the result was made from

    def describe(self, context: dict[str, Any]) -> None:
        """Record what the tool did without a model call (a fallback's reason), for the timeline."""
        self.context = context


@dataclass(frozen=True)
class ModelBudget:
    """What the run may still spend on models, as its command says (the least of what the workflow's
    per-run caps and the policy's budgets left when the step was decided); None: no cap. A tool that
    asks a model checks the call before making it: a cap is a promise that the money is not spent."""

    tokens: int | None = None
    cost_usd: float | None = None

    def refuses(self, tokens: int, cost_usd: float) -> str | None:
        """Why a call estimated at ``tokens`` and ``cost_usd`` (with what this command spent already)
        may not be made; None: it may."""
        if self.tokens is not None and tokens > self.tokens:
            return (
                f"over the run's model budget: the call needs up to {tokens} tokens and the run may spend"
                f" {self.tokens} more (the least its max_tokens_per_run and policy budget max_tokens leave)"
            )
        if self.cost_usd is not None and cost_usd > self.cost_usd:
            return (
                f"over the run's model budget: the call may cost ${cost_usd:.6f} and the run may spend"
                f" ${self.cost_usd:.6f} more (the least its max_cost_usd_per_run and policy budget max_cost_usd leave)"
            )
        return None


@dataclass(frozen=True)
class CallContext:
    """Everything one attempt needs: an HTTP client already carrying the idempotency key, where a tool
    that asks a model reports what it spent (``model_use``), and what the run may still spend (``budget``)."""

    http: httpx.AsyncClient
    run_id: str
    command_id: str
    attempt: int
    model_use: ModelUse = field(default_factory=ModelUse)
    # From the command, read-only: what the run may still spend on models (ModelBudget; no cap by default).
    budget: ModelBudget = field(default_factory=ModelBudget)
    # The runner's: the aiohttp transport under ``http`` (tools/sdk/transport.py), which ``request`` calls
    # directly for the usual call, sparing httpx's client its CPU. None (a test's client): through ``http``.
    direct: AiohttpTransport | None = None

    @property
    def headers(self) -> dict[str, str]:
        # The command id is the idempotency key: an API that honours it turns a repeat of this
        # call (after a crash between the call and the ledger write) into a replay, not an effect.
        return {"Idempotency-Key": self.command_id, "X-Run-Id": self.run_id}

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **self.headers}  # the SDK's keys win
        try:
            if self.direct is not None and kwargs.keys() <= DIRECT_KWARGS:
                response = await self.direct.send(self.http, method, path, headers, **kwargs)
            else:
                response = await self.http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException as exc:
            raise RetryableError(f"{method} {path} timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise RetryableError(f"{method} {path} failed: {exc!r}") from exc
        check(response)
        return response


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def check(response: httpx.Response) -> None:
    """Class an HTTP status: 429 and 5xx are worth retrying, other 4xx are not."""
    status = response.status_code
    if status < 300:
        return
    detail = response.text[:300]
    where = f"{response.request.method} {response.request.url.path}"
    if status == 429:
        raise RetryableError(f"{where} rate limited: {detail}", retry_after=_retry_after(response))
    if status >= 500:
        raise RetryableError(f"{where} answered {status}: {detail}", retry_after=_retry_after(response))
    # Other 4xx, and 3xx (no redirects are followed: an API that moves is a configuration error).
    raise PermanentError(f"{where} answered {status}: {detail}")


def body(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except json.JSONDecodeError as exc:
        raise RetryableError(f"response was not JSON: {response.text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise PermanentError(f"expected a JSON object, got {type(data).__name__}")
    return data


class Tool(Generic[In, Out]):
    """Subclass, set the class attributes, implement ``call`` (and ``compensate`` if it can be undone).

    ``name``: lower case, the command topic and consumer group are named after it. ``description``:
    written for a model choosing a tool. ``version``: change it with the behaviour; an incompatible
    change of the input model is refused by the catalogue while the old version still runs.
    ``timeout_s``: of one call (``None``: the ``tool_timeout_s`` setting). ``retry``: backoff between
    retryable failures, until the command's deadline or ``max_attempts``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    output_model: ClassVar[type[BaseModel]]
    requires_approval: ClassVar[bool] = False
    version: ClassVar[str] = "1"
    timeout_s: ClassVar[float | None] = None
    retry: ClassVar[RetryPolicy] = RetryPolicy()

    async def call(self, args: In, ctx: CallContext) -> Out:
        raise NotImplementedError

    async def compensate(self, args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        raise PermanentError(f"tool {self.name} cannot be compensated")

    def parse(self, arguments: dict[str, Any]) -> BaseModel:
        try:
            return self.input_model.model_validate(arguments)
        except ValidationError as exc:
            raise PermanentError(f"invalid arguments for {self.name}: {exc}") from exc

    def output(self, data: dict[str, Any]) -> BaseModel:
        try:
            return self.output_model.model_validate(data)
        except ValidationError as exc:
            raise PermanentError(f"{self.name} API answered something unexpected: {exc}") from exc

    def call_timeout(self, default_s: float) -> float:
        return self.timeout_s if self.timeout_s is not None else default_s

    @classmethod
    def declaration(cls, **member: Any) -> Announcement:
        """The tool's announcement; ``member`` adds the process's part (member_id, state, at_ms, ...).

        Raises ``TypeError`` naming what is missing or wrong, so a tool that cannot describe itself
        fails at start, not in the catalogue.
        """
        missing = [a for a in ("name", "description", "input_model", "output_model") if not getattr(cls, a, None)]
        if missing:
            raise TypeError(f"tool {cls.__name__} does not declare {', '.join(missing)}")
        for attr in ("input_model", "output_model"):
            model = getattr(cls, attr)
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise TypeError(f"tool {cls.__name__}: {attr} must be a pydantic model, not {model!r}")
        try:
            return Announcement(
                name=cls.name,
                description=cls.description,
                input_schema=cls.input_model.model_json_schema(),
                output_schema=cls.output_model.model_json_schema(),
                requires_approval=cls.requires_approval,
                version=cls.version,
                timeout_s=cls.timeout_s,
                retry=asdict(cls.retry),
                **member,
            )
        except ValidationError as exc:
            raise TypeError(f"tool {cls.__name__} declares something invalid: {exc}") from exc

    def announcement(self) -> dict[str, Any]:
        """The tool's description as JSON-ready data (what the registry carries, without a member)."""
        return self.declaration().model_dump(mode="json", exclude_none=True, exclude={"state"})
