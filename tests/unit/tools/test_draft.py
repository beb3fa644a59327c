"""The draft tool: the validator of a model's welcome email, and the tool against the scripted fake model
over real HTTP (the model is the one stand-in; no Kafka or PostgreSQL is involved in one call)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from streamagent.processors.decision.llm.context import message_tokens
from streamagent.tools.draft import Drafted, DraftEmail, DraftInput
from streamagent.tools.drafting import (
    BODY_MAX_CHARS,
    DRAFT_MARKER,
    MAX_COMPLETION_TOKENS,
    Draft,
    Facts,
    UnreadableAnswer,
    facts_of,
    messages,
    problems,
    prompt_tokens,
    read_answer,
)
from streamagent.tools.sandbox.model import DRAFTED_SIGNATURE, Answer, FakeModel
from streamagent.tools.sdk import CallContext
from streamagent.tools.sdk.tool import ModelBudget, ModelUse

from streamagent import codec
from streamagent.config import Settings
from streamagent.events import ToolResult, ToolStatus

FACTS = Facts(company_name="Acme Robotics", contact_name="Ada Lovelace", jira_key="ACME1X2Y3Z", industry="robotics")
GOOD = Draft(
    subject="Welcome aboard, Acme Robotics",
    body=(
        "Dear Ada Lovelace,\n\nYour onboarding project ACME1X2Y3Z is open and our robotics team is on it."
        " We will send the first milestones this week.\n\nThe onboarding team"
    ),
)


# -- the validator ---------------------------------------------------------------------------------
def test_a_draft_with_every_fact_and_no_placeholder_passes() -> None:
    assert problems(GOOD, FACTS) == []


def test_facts_are_found_whatever_their_case() -> None:
    shouting = GOOD.model_copy(update={"body": GOOD.body.upper()})
    assert problems(shouting, FACTS) == []


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("Acme Robotics", "the company name 'Acme Robotics' is missing"),
        ("ACME1X2Y3Z", "the Jira key 'ACME1X2Y3Z' is missing"),
        ("Ada Lovelace", "the contact name 'Ada Lovelace' is missing"),
    ],
)
def test_each_required_fact_missing_is_named(missing: str, named: str) -> None:
    draft = Draft(subject=GOOD.subject.replace(missing, "you"), body=GOOD.body.replace(missing, "your team"))
    assert named in problems(draft, FACTS)


@pytest.mark.parametrize("placeholder", ["{contact_name}", "[Your Name]", "[Name]", "<contact name>", "{ }"])
def test_a_placeholder_left_in_the_draft_is_refused(placeholder: str) -> None:
    draft = GOOD.model_copy(update={"body": GOOD.body + f"\n\nBest regards,\n{placeholder}"})
    assert problems(draft, FACTS) == [f"a placeholder is left: {placeholder!r}"]


def test_an_email_address_in_angle_brackets_is_not_a_placeholder() -> None:
    draft = GOOD.model_copy(update={"body": GOOD.body + "\nWrite to us: Onboarding <onboarding@streamagent.dev>"})
    assert problems(draft, FACTS) == []


def test_length_bounds() -> None:
    short = Draft(subject="Acme Robotics ACME1X2Y3Z", body="Hi Ada Lovelace")
    assert "the body has 15 characters, fewer than 80" in problems(short, FACTS)
    long = GOOD.model_copy(update={"body": GOOD.body + "x" * BODY_MAX_CHARS})
    assert any(p.startswith("the body has") and f"more than {BODY_MAX_CHARS}" in p for p in problems(long, FACTS))
    assert "the subject is empty" in problems(GOOD.model_copy(update={"subject": "  "}), FACTS)
    assert "the subject spans several lines" in problems(GOOD.model_copy(update={"subject": "Hi\nthere"}), FACTS)
    assert any("more than 150" in p for p in problems(GOOD.model_copy(update={"subject": "s" * 151}), FACTS))


def test_the_answer_is_read_as_json_also_inside_a_code_fence() -> None:
    raw = json.dumps(GOOD.model_dump())
    assert read_answer(raw) == GOOD
    assert read_answer(f"```json\n{raw}\n```") == GOOD
    with pytest.raises(UnreadableAnswer, match="subject and body"):
        read_answer("Dear Ada, welcome!")
    with pytest.raises(UnreadableAnswer, match="body"):
        read_answer('{"subject": "Welcome"}')


def test_the_prompt_carries_the_facts_and_the_fake_reads_them_back() -> None:
    sent = messages(FACTS)
    assert sent[0]["content"].startswith(DRAFT_MARKER)
    assert facts_of(sent) == {k: v for k, v in FACTS.model_dump().items() if v not in ("", None)}
    assert facts_of([{"role": "system", "content": "You decide the next step"}]) is None


# -- the tool, against the fake model over HTTP --------------------------------------------------------
ARGS = DraftInput(
    **FACTS.model_dump(),
    template_subject="Welcome to streamagent, Acme Robotics",
    template_body="Hello Ada Lovelace,\n\nWelcome aboard! We set up Jira project ACME1X2Y3Z for Acme Robotics.\n",
)


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


def _draft(settings: Settings, budget: ModelBudget | None = None) -> tuple[Drafted, ModelUse]:
    async def go() -> tuple[Drafted, ModelUse]:
        used = ModelUse()
        async with httpx.AsyncClient() as http:
            ctx = CallContext(http, "run-1", "cmd-1", 1, used, budget or ModelBudget())
            out = await DraftEmail(settings).call(ARGS, ctx)
        return out, used

    return asyncio.run(go())


def _settings(model: FakeModel, **update: object) -> Settings:
    return Settings(openai_base_url=model.url, model="fake-writer", model_max_retries=0, **update)  # type: ignore[arg-type]


def test_no_model_configured_sends_the_template_and_says_why() -> None:
    out, used = _draft(Settings())
    assert out.drafted_by == "template" and out.subject == ARGS.template_subject and out.body == ARGS.template_body
    assert out.fallback_reason == "no model configured (OPENAI_BASE_URL is empty)"
    assert used.prompt_tokens == 0 and used.model is None
    assert used.context == {"drafted_by": "template", "fallback_reason": out.fallback_reason}


def test_the_model_drafts_the_mail_and_its_tokens_cost_and_prompt_are_reported(model: FakeModel) -> None:
    prices = json.dumps({"fake-writer": {"prompt": 1.0, "completion": 2.0}})
    out, used = _draft(_settings(model, model_prices=prices))
    assert out.drafted_by == "model" and out.fallback_reason is None and out.model == "fake-writer"
    assert DRAFTED_SIGNATURE in out.body and "ACME1X2Y3Z" in out.subject
    assert len(model.drafts) == 1 and model.calls == 0 and model.drafts[0].model == "fake-writer"
    assert used.model == "fake-writer" and used.prompt_tokens > 0 and used.completion_tokens > 0
    assert used.cost_usd == pytest.approx((used.prompt_tokens * 1.0 + used.completion_tokens * 2.0) / 1000)
    assert used.context["messages"] == model.drafts[0].messages
    assert json.loads(used.context["answer"])["body"] == out.body
    assert used.context["drafted_by"] == "model"


def test_the_draft_model_setting_picks_the_model(model: FakeModel) -> None:
    out, _ = _draft(_settings(model, draft_model="cheap-writer"))
    assert out.model == "cheap-writer" and model.drafts[0].model == "cheap-writer"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            Answer.text(json.dumps({"subject": "Welcome, Acme Robotics", "body": "Dear [Name], " + "welcome! " * 20})),
            "the model's draft was refused: the Jira key 'ACME1X2Y3Z' is missing; the contact name 'Ada Lovelace'"
            " is missing; a placeholder is left: '[Name]'",
        ),
        (Answer.text("Dear Ada, welcome aboard!"), "the model's answer was refused: the answer is not a JSON object"),
        (Answer.error(500), "the model could not be asked: InternalServerError"),
    ],
    ids=["fails-validation", "not-json", "model-down"],
)
def test_a_draft_that_fails_falls_back_to_the_template_and_says_why(
    model: FakeModel, answer: Answer, reason: str
) -> None:
    model.script_draft(answer)
    out, used = _draft(_settings(model))
    assert out.drafted_by == "template" and out.body == ARGS.template_body
    assert out.fallback_reason is not None and out.fallback_reason.startswith(reason)
    assert used.context["fallback_reason"] == out.fallback_reason and used.context["messages"]
    if answer.status == 200:  # an answer was paid for, even though it was refused
        assert used.prompt_tokens > 0 and used.context["answer"] == answer.content


# -- the run's model budget, checked before the call ----------------------------------------------------
NEED = prompt_tokens(messages(FACTS)) + MAX_COMPLETION_TOKENS  # the prompt and the longest answer allowed


def test_the_prompt_is_counted_as_the_model_decider_counts_its_own() -> None:
    assert prompt_tokens(messages(FACTS)) == message_tokens(messages(FACTS))


def test_a_draft_over_the_runs_token_budget_sends_the_template_without_asking_the_model(model: FakeModel) -> None:
    out, used = _draft(_settings(model), ModelBudget(tokens=NEED - 1))
    assert len(model.drafts) == 0 and model.calls == 0  # the model was not asked
    assert out.drafted_by == "template" and out.body == ARGS.template_body
    assert out.fallback_reason == (
        f"over the run's model budget: the call needs up to {NEED} tokens and the run may spend {NEED - 1} more"
        " (the least its max_tokens_per_run and policy budget max_tokens leave)"
    )
    assert (used.prompt_tokens, used.completion_tokens, used.cost_usd) == (0, 0, 0.0)  # nothing spent
    assert used.context["fallback_reason"] == out.fallback_reason and used.context["messages"]


def test_a_draft_over_the_runs_cost_budget_sends_the_template_without_asking_the_model(model: FakeModel) -> None:
    prices = json.dumps({"fake-writer": {"prompt": 1.0, "completion": 2.0}})
    out, _ = _draft(_settings(model, model_prices=prices), ModelBudget(tokens=NEED, cost_usd=0.001))
    assert len(model.drafts) == 0 and out.drafted_by == "template"
    assert out.fallback_reason is not None and out.fallback_reason.startswith("over the run's model budget: the call")
    assert "max_cost_usd_per_run and policy budget max_cost_usd" in out.fallback_reason


def test_a_draft_that_fits_the_budget_asks_the_model_with_its_answer_bounded(model: FakeModel) -> None:
    out, used = _draft(_settings(model), ModelBudget(tokens=NEED, cost_usd=1.0))
    assert out.drafted_by == "model" and len(model.drafts) == 1
    # The answer's bound reserved by the check is the one the endpoint is asked to keep.
    assert model.drafts[0].body["max_tokens"] == MAX_COMPLETION_TOKENS
    assert used.prompt_tokens + used.completion_tokens <= NEED


# -- the result event ------------------------------------------------------------------------------
def test_a_tool_result_written_with_the_v1_schema_decodes_with_no_model_use() -> None:
    """A result from before v2 (no model fields) still decodes, as a tool that asked no model."""
    import io

    import fastavro

    v1 = json.loads((codec.SCHEMA_DIR / "history" / "ToolResult.v1.avsc").read_text())
    assert "prompt_tokens" not in {f["name"] for f in v1["fields"]}
    old = {
        "event_id": "old-result",
        "run_id": "run-1",
        "causation_id": "c-1",
        "occurred_at": datetime(2026, 12, 1, tzinfo=UTC),
        "schema_version": 1,
        "command_id": "c-1",
        "tool": "email",
        "step": "email",
        "operation": "execute",
        "status": "succeeded",
        "output": '{"message_id": "m-1"}',
        "error": None,
        "error_kind": None,
        "attempts": 1,
        "duration_ms": 12,
    }
    buf = io.BytesIO()
    parsed = fastavro.parse_schema(v1, _write_hint=False)
    fastavro.schemaless_writer(buf, parsed, old)
    decoded = codec.decode(b"\xc3\x01" + codec.fingerprint(parsed) + buf.getvalue())
    assert isinstance(decoded, ToolResult) and decoded.schema_version == 1
    assert decoded.output == {"message_id": "m-1"} and decoded.status is ToolStatus.succeeded
    assert (decoded.model, decoded.prompt_tokens, decoded.cost_usd, decoded.model_context) == (None, 0, 0.0, {})


def test_a_tool_result_carries_its_model_use_through_the_codec() -> None:
    result = ToolResult(
        run_id="run-1",
        command_id="c-1",
        tool="draft",
        step="draft",
        status=ToolStatus.succeeded,
        model="m",
        prompt_tokens=120,
        completion_tokens=80,
        cost_usd=0.0004,
        model_context={"messages": [{"role": "user", "content": "hi"}], "answer": "{}"},
    )
    assert codec.decode(codec.encode(result)) == result
