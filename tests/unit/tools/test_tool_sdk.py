"""The tool SDK: retry policy, HTTP classification, circuit breaker, offsets, and the four real tools.

External HTTP APIs are imitated with ``httpx.MockTransport``; the transport answers through the
sandbox's own API handlers (``streamagent.tools.sandbox.apis``), so a tool that drifts from the sandbox fails.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from streamagent.tools import builtin_tools
from streamagent.tools.crm import Crm
from streamagent.tools.draft import DraftEmail
from streamagent.tools.email import SENDER, Email, Mail, Sent
from streamagent.tools.enrich import Company, Enrich, EnrichInput
from streamagent.tools.jira import Jira, Project, ProjectRequest
from streamagent.tools.sandbox.apis import ApiRequest, company_profile, make_apis
from streamagent.tools.sdk import (
    CallContext,
    PermanentError,
    RetryableError,
    RetryPolicy,
    Tool,
    body,
    check,
)
from streamagent.tools.sdk.breaker import BreakerState, CircuitBreaker
from streamagent.tools.sdk.offsets import PartitionOffsets
from streamagent.tools.slack import Post, Posted, Slack

BASE = "http://sandbox.test"
RUN = "run-42"
COMMAND = "cmd-run-42-enrich"


# -- retry policy ------------------------------------------------------------------------------------
class UpperJitter(random.Random):
    """An RNG whose jitter is always the top of its range, to see the bare backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(initial_s=0.05, multiplier=2.0, max_backoff_s=2.0)
    delays = [policy.backoff(attempt, rng=UpperJitter()) for attempt in range(1, 10)]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


def test_backoff_follows_the_policy_parameters() -> None:
    policy = RetryPolicy(initial_s=1.0, multiplier=3.0, max_backoff_s=20.0)
    assert [policy.backoff(a, rng=UpperJitter()) for a in (1, 2, 3, 4)] == pytest.approx([1.0, 3.0, 9.0, 20.0])


@pytest.mark.parametrize("attempt", [1, 3, 5, 12])
def test_jitter_stays_within_half_and_full_backoff(attempt: int) -> None:
    policy = RetryPolicy()
    base = min(policy.max_backoff_s, policy.initial_s * policy.multiplier ** (attempt - 1))
    rng = random.Random(1234)
    delays = [policy.backoff(attempt, rng=rng) for _ in range(2000)]
    assert all(0.5 * base <= d <= base for d in delays)
    # The jitter is real and spread over the range, not a constant.
    assert min(delays) < 0.55 * base
    assert max(delays) > 0.95 * base


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    first = [policy.backoff(a, rng=random.Random(7)) for a in range(1, 8)]
    second = [policy.backoff(a, rng=random.Random(7)) for a in range(1, 8)]
    assert first == second


@pytest.mark.parametrize(("attempt", "retry_after", "expected"), [(1, 3.0, 3.0), (2, 0.75, 0.75), (9, 0.01, 2.0)])
def test_retry_after_is_a_floor(attempt: int, retry_after: float, expected: float) -> None:
    policy = RetryPolicy()
    assert policy.backoff(attempt, retry_after=retry_after, rng=UpperJitter()) == pytest.approx(expected)
    # Whatever the jitter, never below the server's Retry-After.
    rng = random.Random(99)
    assert all(policy.backoff(attempt, retry_after=retry_after, rng=rng) >= retry_after for _ in range(200))


def test_max_attempts_zero_never_exhausts() -> None:
    policy = RetryPolicy(max_attempts=0)
    assert not any(policy.exhausted(attempt) for attempt in (1, 2, 10, 1000, 10**9))
    assert Tool.retry.max_attempts == 0  # the SDK default retries until the command's deadline


def test_max_attempts_exhausts_at_the_limit() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(attempt) for attempt in (1, 2, 3, 4)] == [False, False, True, True]


# -- check / body ------------------------------------------------------------------------------------
def response(status: int, headers: dict[str, str] | None = None, content: bytes = b"detail") -> httpx.Response:
    return httpx.Response(
        status, headers=headers, content=content, request=httpx.Request("POST", f"{BASE}/jira/rest/api/3/project")
    )


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_check_passes_2xx(status: int) -> None:
    check(response(status))


@pytest.mark.parametrize(
    ("headers", "retry_after"), [({"Retry-After": "1.5"}, 1.5), ({}, None), ({"Retry-After": "soon"}, None)]
)
def test_check_429_is_retryable_with_retry_after(headers: dict[str, str], retry_after: float | None) -> None:
    with pytest.raises(RetryableError) as info:
        check(response(429, headers))
    assert info.value.retry_after == retry_after
    assert "rate limited" in str(info.value)
    assert "POST /jira/rest/api/3/project" in str(info.value)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_check_5xx_is_retryable(status: int) -> None:
    with pytest.raises(RetryableError) as info:
        check(response(status, {"Retry-After": "2"}, b"upstream down"))
    assert str(status) in str(info.value)
    assert "upstream down" in str(info.value)
    assert info.value.retry_after == 2.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_check_other_4xx_is_permanent(status: int) -> None:
    with pytest.raises(PermanentError) as info:
        check(response(status, content=b"bad key"))
    assert not isinstance(info.value, RetryableError)
    assert str(status) in str(info.value) and "bad key" in str(info.value)


def test_body_returns_a_json_object() -> None:
    assert body(response(200, content=b'{"id": "1", "n": [1]}')) == {"id": "1", "n": [1]}


def test_body_of_a_non_object_is_permanent() -> None:
    with pytest.raises(PermanentError):
        body(response(200, content=b"[1, 2]"))


def test_body_that_is_not_json_is_retryable() -> None:
    with pytest.raises(RetryableError):
        body(response(200, content=b"<html>gateway</html>"))


# -- CallContext.request -----------------------------------------------------------------------------
def _call(handler: Callable[[httpx.Request], httpx.Response], method: str = "GET", path: str = "/x") -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(handler)) as http:
            ctx = CallContext(http=http, run_id=RUN, command_id=COMMAND, attempt=1)
            return await ctx.request(method, path, headers={"X-Extra": "1"})

    return asyncio.run(go())


def test_request_carries_the_idempotency_key_and_run_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    answer = _call(handler, "POST", "/slack/api/chat.postMessage")
    assert answer.status_code == 200
    (request,) = seen
    assert request.headers["Idempotency-Key"] == COMMAND
    assert request.headers["X-Run-Id"] == RUN
    assert request.headers["X-Extra"] == "1"
    assert request.method == "POST"
    assert request.url == httpx.URL(f"{BASE}/slack/api/chat.postMessage")


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.PoolTimeout("pool"),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("peer closed connection"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_timeouts_and_connection_errors_are_retryable(exc: httpx.TransportError) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(RetryableError) as info:
        _call(handler, "GET", "/enrich/v2/companies/find")
    assert info.value.__cause__ is exc
    assert "/enrich/v2/companies/find" in str(info.value)


@pytest.mark.parametrize(("status", "error"), [(503, RetryableError), (429, RetryableError), (404, PermanentError)])
def test_request_checks_the_status(status: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        _call(lambda request: httpx.Response(status, text="no"))


# -- circuit breaker ---------------------------------------------------------------------------------
def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The state now (a call, so type checkers do not narrow it across awaits)."""
    return breaker.state


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    async def scenario() -> None:
        breaker = CircuitBreaker("unit-open", failure_threshold=3, cooldown_s=60)
        await breaker.failure()
        await breaker.failure()
        await breaker.success()  # resets the consecutive count
        await breaker.failure()
        await breaker.failure()
        assert state_of(breaker) is BreakerState.closed
        assert await breaker.acquire(time.monotonic()) is True
        await breaker.failure()
        assert state_of(breaker) is BreakerState.open
        assert breaker.opened_count == 1

    asyncio.run(scenario())


def test_open_breaker_refuses_when_the_deadline_passes_first() -> None:
    async def scenario() -> None:
        breaker = CircuitBreaker("unit-deadline", failure_threshold=1, cooldown_s=60)
        await breaker.failure()
        deadline = time.monotonic() + 0.05
        assert await breaker.acquire(deadline) is False
        assert time.monotonic() >= deadline  # it waited for the deadline, it did not give up early
        assert state_of(breaker) is BreakerState.open
        assert await breaker.acquire(time.monotonic()) is False  # a passed deadline: refused at once

    asyncio.run(scenario())


def test_after_cooldown_one_probe_goes_through_and_its_success_releases_the_waiters() -> None:
    async def scenario() -> None:
        breaker = CircuitBreaker("unit-probe", failure_threshold=1, cooldown_s=0.05)
        await breaker.failure()
        opened_at = breaker.opened_at
        callers = {asyncio.create_task(breaker.acquire(time.monotonic() + 30)) for _ in range(2)}
        done, pending = await asyncio.wait(callers, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 1
        probe, waiter = done.pop(), pending.pop()
        assert probe.result() is True
        assert time.monotonic() >= opened_at + 0.05
        assert state_of(breaker) is BreakerState.half_open

        # While the probe is out nobody else gets through: a caller with a short deadline is refused.
        assert await breaker.acquire(time.monotonic() + 0.05) is False
        assert not waiter.done()

        await breaker.success()
        assert state_of(breaker) is BreakerState.closed
        assert await asyncio.wait_for(waiter, timeout=5) is True  # released by the success, long before 30 s

    asyncio.run(scenario())


def test_a_failed_probe_opens_the_breaker_again() -> None:
    async def scenario() -> None:
        breaker = CircuitBreaker("unit-reopen", failure_threshold=1, cooldown_s=0.05)
        await breaker.failure()
        assert await breaker.acquire(time.monotonic() + 10) is True
        assert state_of(breaker) is BreakerState.half_open
        waiter = asyncio.create_task(breaker.acquire(time.monotonic() + 30))

        await breaker.failure()
        assert state_of(breaker) is BreakerState.open
        assert breaker.opened_count == 2
        reopened_at = breaker.opened_at

        # The waiter becomes the next probe, but only after a fresh cooldown.
        assert await asyncio.wait_for(waiter, timeout=5) is True
        assert time.monotonic() >= reopened_at + 0.05
        assert state_of(breaker) is BreakerState.half_open

    asyncio.run(scenario())


# -- partition offsets -------------------------------------------------------------------------------
def test_offsets_expose_only_the_contiguous_done_prefix() -> None:
    offsets = PartitionOffsets()
    assert offsets.committable() is None
    for offset in (10, 11, 12, 13):
        offsets.received(offset)
    offsets.done(12)
    offsets.done(11)
    assert offsets.committable() == 10  # 10 still runs: nothing past it
    offsets.committed = 10
    assert offsets.committable() is None
    offsets.done(10)
    assert offsets.committable() == 13  # 10, 11, 12 done; 13 still runs
    offsets.committed = 13
    assert offsets.committable() is None
    offsets.done(13)
    assert offsets.committable() == 14
    offsets.committed = 14
    assert offsets.committable() is None


@pytest.mark.parametrize("seed", range(20))
def test_out_of_order_completion_never_commits_past_unfinished_work(seed: int) -> None:
    rng = random.Random(seed)
    start = rng.randrange(0, 1000)
    received = list(range(start, start + 40))
    offsets = PartitionOffsets()
    for offset in received:
        offsets.received(offset)
    finished: set[int] = set()
    commits: list[int] = []
    for offset in rng.sample(received, len(received)):
        offsets.done(offset)
        finished.add(offset)
        candidate = offsets.committable()
        if candidate is None:
            continue
        assert all(o in finished for o in received if o < candidate)  # everything below it is done
        assert not commits or candidate > commits[-1]  # nothing committable twice
        commits.append(candidate)
        offsets.committed = candidate
        assert offsets.committable() is None
    assert commits[-1] == start + len(received)
    assert len(commits) == len(set(commits))


def test_offsets_received_while_others_run_keep_the_prefix() -> None:
    offsets = PartitionOffsets()
    offsets.received(0)
    offsets.received(1)
    offsets.done(1)
    offsets.received(2)
    assert offsets.committable() == 0
    offsets.done(0)
    assert offsets.committable() == 2
    offsets.done(2)
    assert offsets.committable() == 3


# -- tools: parse and announcement -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        (Enrich(), {}),
        (Enrich(), {"domain": ["acme.io"]}),
        (Jira(), {"key": "acme", "name": "Acme", "lead_email": "a@acme.io"}),
        (Jira(), {"key": "A", "name": "Acme", "lead_email": "a@acme.io"}),
        (Jira(), {"key": "ACME", "name": "Acme"}),
        (Email(), {"to": "not-an-email", "subject": "s", "body": "b"}),
        (Email(), {"to": "a@acme.io", "subject": "s"}),
        (Slack(), {"channel": "#onboarding"}),
    ],
    ids=lambda v: v.name if isinstance(v, Tool) else None,
)
def test_parse_rejects_invalid_arguments_permanently(tool: Tool[Any, Any], arguments: dict[str, Any]) -> None:
    with pytest.raises(PermanentError, match=f"invalid arguments for {tool.name}"):
        tool.parse(arguments)


@pytest.mark.parametrize(
    ("tool", "arguments", "model"),
    [
        (Enrich(), {"domain": "acme.io"}, EnrichInput),
        (Jira(), {"key": "ACME1A2B", "name": "Acme", "lead_email": "a@acme.io"}, ProjectRequest),
        (Email(), {"to": "a@acme.io", "subject": "s", "body": "b"}, Mail),
        (Slack(), {"channel": "#onboarding", "text": "hi"}, Post),
    ],
    ids=lambda v: v.name if isinstance(v, Tool) else None,
)
def test_parse_accepts_valid_arguments(tool: Tool[Any, Any], arguments: dict[str, Any], model: type[BaseModel]) -> None:
    parsed = tool.parse(arguments)
    assert isinstance(parsed, model)
    assert parsed.model_dump(include=set(arguments)) == arguments


def test_output_rejects_an_unexpected_api_answer() -> None:
    with pytest.raises(PermanentError):
        Enrich().output({"name": "Acme"})
    assert Enrich().output(company_profile("acme.io")) == Company.model_validate(company_profile("acme.io"))


@pytest.mark.parametrize("name", ["enrich", "jira", "email", "slack", "crm"])
def test_announcement_describes_the_tool(name: str) -> None:
    tool = builtin_tools()[name]()
    announcement = tool.announcement()
    assert announcement["name"] == name == tool.name
    assert isinstance(announcement["description"], str) and announcement["description"]
    schema = announcement["input_schema"]
    assert schema["type"] == "object"
    assert set(schema["properties"]) == set(tool.input_model.model_fields)
    assert announcement["requires_approval"] is False
    assert announcement["version"] == "1"
    json.dumps(announcement)  # goes on the registry topic as JSON


def test_builtin_tools_are_the_onboarding_tools_and_crm() -> None:
    # Tools of this repository only: a tool package another test installs into the venv meanwhile is no builtin.
    ours = {name: cls for name, cls in builtin_tools().items() if cls.__module__.startswith("streamagent.tools.")}
    assert ours == {
        "enrich": Enrich,
        "jira": Jira,
        "draft": DraftEmail,
        "email": Email,
        "slack": Slack,
        "crm": Crm,
    }


# -- tools against a sandbox-like transport ----------------------------------------------------------
PREFIXES = ("enrich", "jira", "email", "slack")


@dataclass
class Sandbox:
    """A MockTransport handler answering through the sandbox's API handlers, recording every request."""

    requests: list[httpx.Request] = field(default_factory=list)
    apis: dict[str, Any] = field(default_factory=make_apis)
    override: Callable[[httpx.Request], httpx.Response | None] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.override is not None and (answer := self.override(request)) is not None:
            return answer
        prefix, _, rest = request.url.path.lstrip("/").partition("/")
        api = self.apis.get(prefix)
        matched = api.match(request.method, "/" + rest) if api else None
        if api is None or matched is None:
            return httpx.Response(404, json={"error": "no such endpoint"})
        op, params = matched
        answer_ = api.handle(
            op,
            ApiRequest(
                method=request.method,
                path="/" + rest,
                params=params,
                query=dict(request.url.params),
                body=json.loads(request.content) if request.content else None,
                idempotency_key=request.headers.get("Idempotency-Key"),
                base_url=BASE,
            ),
        )
        if answer_.body is None:
            return httpx.Response(answer_.status, headers=answer_.headers)
        return httpx.Response(answer_.status, json=answer_.body, headers=answer_.headers)


def run_tool(tool: Tool[Any, Any], arguments: dict[str, Any], sandbox: Sandbox, command_id: str = COMMAND) -> Any:
    async def go() -> Any:
        async with httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(sandbox)) as http:
            ctx = CallContext(http=http, run_id=RUN, command_id=command_id, attempt=1)
            return await tool.call(tool.parse(arguments), ctx)

    return asyncio.run(go())


def _only(sandbox: Sandbox) -> httpx.Request:
    assert len(sandbox.requests) == 1
    request = sandbox.requests[0]
    assert request.headers["Idempotency-Key"] == COMMAND
    assert request.headers["X-Run-Id"] == RUN
    return request


def test_enrich_calls_the_find_endpoint_and_parses_the_company() -> None:
    sandbox = Sandbox()
    company = run_tool(Enrich(), {"domain": "globex.com"}, sandbox)
    request = _only(sandbox)
    assert request.method == "GET"
    assert request.url.path == "/enrich/v2/companies/find"
    assert request.url.params["domain"] == "globex.com"
    assert isinstance(company, Company)
    assert company.model_dump() == company_profile("globex.com")


def test_enrich_unknown_company_is_permanent() -> None:
    with pytest.raises(PermanentError, match="404"):
        run_tool(Enrich(), {"domain": "nobody.invalid"}, Sandbox())


def test_jira_creates_the_project() -> None:
    sandbox = Sandbox()
    args = {"key": "ACME1A2B", "name": "Acme onboarding", "description": "Software", "lead_email": "a@acme.io"}
    project = run_tool(Jira(), args, sandbox)
    request = _only(sandbox)
    assert (request.method, request.url.path) == ("POST", "/jira/rest/api/3/project")
    assert json.loads(request.content) == {
        "key": "ACME1A2B",
        "name": "Acme onboarding",
        "description": "Software",
        "leadAccountEmail": "a@acme.io",
    }
    assert project == Project(id="10001", key="ACME1A2B", url=f"{BASE}/jira/rest/api/3/project/10001")


def test_jira_numeric_id_is_kept_as_a_string() -> None:
    sandbox = Sandbox(override=lambda r: httpx.Response(201, json={"id": 10042, "key": "ACME", "self": "u"}))
    project = run_tool(Jira(), {"key": "ACME", "name": "n", "lead_email": "a@acme.io"}, sandbox)
    assert project == Project(id="10042", key="ACME", url="u")


def test_jira_key_taken_by_another_command_is_permanent() -> None:
    sandbox = Sandbox()
    args = {"key": "ACME", "name": "n", "lead_email": "a@acme.io"}
    run_tool(Jira(), args, sandbox, command_id="cmd-other-run")
    with pytest.raises(PermanentError, match="409"):
        run_tool(Jira(), args, sandbox, command_id="cmd-this-run")


def test_jira_compensation_deletes_the_project() -> None:
    sandbox = Sandbox()
    args = {"key": "ACME", "name": "n", "lead_email": "a@acme.io"}
    run_tool(Jira(), args, sandbox)

    async def undo() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(sandbox)) as http:
            ctx = CallContext(http=http, run_id=RUN, command_id="cmd-undo", attempt=1)
            return await Jira().compensate({"key": "ACME"}, ctx)

    assert asyncio.run(undo()) == {"closed": "ACME"}
    delete = sandbox.requests[-1]
    assert (delete.method, delete.url.path) == ("DELETE", "/jira/rest/api/3/project/ACME")
    with pytest.raises(PermanentError, match="404"):  # it is gone
        asyncio.run(undo())


def test_a_tool_without_compensation_refuses_to_compensate() -> None:
    async def go() -> None:
        async with httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(Sandbox())) as http:
            await Slack().compensate({}, CallContext(http=http, run_id=RUN, command_id="c", attempt=1))

    with pytest.raises(PermanentError, match="cannot be compensated"):
        asyncio.run(go())


def test_email_sends_the_mail() -> None:
    sandbox = Sandbox()
    sent = run_tool(Email(), {"to": "ada@acme.io", "subject": "Welcome", "body": "Hello Ada"}, sandbox)
    request = _only(sandbox)
    assert (request.method, request.url.path) == ("POST", "/email/v3/mail/send")
    assert json.loads(request.content) == {
        "personalizations": [{"to": [{"email": "ada@acme.io"}]}],
        "from": {"email": SENDER},
        "subject": "Welcome",
        "content": [{"type": "text/plain", "value": "Hello Ada"}],
    }
    assert isinstance(sent, Sent)
    assert sent.to == "ada@acme.io"
    assert sent.message_id


def test_email_to_a_rejected_recipient_is_permanent() -> None:
    # email-validator already refuses the reserved .invalid domain at parse time ...
    with pytest.raises(PermanentError, match="invalid arguments"):
        Email().parse({"to": "someone@bounce.invalid", "subject": "s", "body": "b"})
    # ... and the API's own refusal of a recipient is permanent too.
    mail = Mail.model_construct(to="someone@bounce.invalid", subject="s", body="b")

    async def go() -> Sent:
        async with httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(Sandbox())) as http:
            return await Email().call(mail, CallContext(http=http, run_id=RUN, command_id=COMMAND, attempt=1))

    with pytest.raises(PermanentError, match=r"400.*recipient rejected"):
        asyncio.run(go())


def test_slack_posts_the_message() -> None:
    sandbox = Sandbox()
    posted = run_tool(Slack(), {"channel": "#onboarding", "text": "New client Acme"}, sandbox)
    request = _only(sandbox)
    assert (request.method, request.url.path) == ("POST", "/slack/api/chat.postMessage")
    assert json.loads(request.content) == {"channel": "#onboarding", "text": "New client Acme"}
    assert isinstance(posted, Posted)
    assert posted.channel == "#onboarding"
    assert posted.ts


def test_slack_ok_false_is_permanent() -> None:
    sandbox = Sandbox()
    with pytest.raises(PermanentError, match="no_text"):
        run_tool(Slack(), {"channel": "#onboarding", "text": ""}, sandbox)
    assert len(sandbox.requests) == 1
    override = Sandbox(override=lambda r: httpx.Response(200, json={"ok": False, "error": "channel_not_found"}))
    with pytest.raises(PermanentError, match="channel_not_found"):
        run_tool(Slack(), {"channel": "#nowhere", "text": "hi"}, override)


@pytest.mark.parametrize("name", ["enrich", "jira", "email", "slack"])
@pytest.mark.parametrize(("status", "error"), [(503, RetryableError), (429, RetryableError), (400, PermanentError)])
def test_every_tool_classes_api_errors(name: str, status: int, error: type[Exception]) -> None:
    arguments = {
        "enrich": {"domain": "acme.io"},
        "jira": {"key": "ACME", "name": "n", "lead_email": "a@acme.io"},
        "email": {"to": "a@acme.io", "subject": "s", "body": "b"},
        "slack": {"channel": "#c", "text": "t"},
    }[name]
    sandbox = Sandbox(
        override=lambda r: httpx.Response(status, json={"error": "injected"}, headers={"Retry-After": "0.2"})
    )
    with pytest.raises(error):
        run_tool(builtin_tools()[name](), arguments, sandbox)
    assert sandbox.requests[0].url.path.startswith(f"/{name}/")


@pytest.mark.parametrize(
    ("name", "arguments", "answer"),
    [
        ("enrich", {"domain": "acme.io"}, {"name": "Acme"}),
        ("jira", {"key": "ACME", "name": "n", "lead_email": "a@acme.io"}, {"key": "ACME"}),
        ("email", {"to": "a@acme.io", "subject": "s", "body": "b"}, {"queued": True}),
        ("slack", {"channel": "#c", "text": "t"}, {"ok": True}),
    ],
)
def test_an_unexpected_api_answer_is_a_permanent_error(name: str, arguments: dict[str, Any], answer: Any) -> None:
    sandbox = Sandbox(override=lambda r: httpx.Response(200, json=answer))
    with pytest.raises(PermanentError):
        run_tool(builtin_tools()[name](), arguments, sandbox)
