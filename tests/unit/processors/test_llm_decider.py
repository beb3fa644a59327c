"""The LLM decider against the scripted fake model: the real openai client over real HTTP."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from llm_runs import DOMAIN, Run, entries
from prometheus_client import REGISTRY
from streamagent.processors.decision.arguments import catalogue_check
from streamagent.processors.decision.llm.decider import LlmDecider
from streamagent.processors.decision.processor import DecisionHandler, make_decider
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.workflow import ONBOARDING, WorkflowError, load_workflow
from streamagent.tools.sandbox.model import Answer, FakeModel
from test_decision_handler import LandingProducer, _batch

from streamagent import codec, db
from streamagent.config import Settings, SettingsError, settings_from, to_env
from streamagent.events import DecisionAction, ToolCommand
from streamagent.topics import RUN_EVENTS

PRICES = {"test-model": {"prompt": 0.5, "completion": 1.5}}
ENTRIES = entries()


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


def llm_settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "decider": "llm",
        "openai_base_url": url,
        "model": "test-model",
        "model_timeout_s": 5.0,
        "model_max_retries": 2,
        "model_prices": json.dumps(PRICES),
        **overrides,
    }
    return Settings.model_validate(values)


def decider(settings: Settings, workflow=ONBOARDING, available=lambda _t: True) -> LlmDecider:  # type: ignore[no-untyped-def]
    return LlmDecider(settings, {workflow.name: workflow}, available, catalogue_check(ENTRIES.get), ENTRIES.get)


def test_a_tool_call_dispatches_with_validated_arguments_tokens_and_cost(model: FakeModel) -> None:
    model.script(Answer.call("enrich", {"domain": DOMAIN}))
    decision = decider(llm_settings(model.url)).decide(Run().snap)
    assert decision is not None
    assert (decision.action, decision.step, decision.tool) == (DecisionAction.dispatch, "enrich", "enrich")
    assert decision.arguments == {"domain": DOMAIN}
    assert model.calls == 1
    sent = model.requests[0]
    assert sent.model == "test-model"
    assert sent.tools == ["enrich", "jira", "draft", "email", "slack", "complete", "escalate", "wait"]
    # What the model saw and answered is recorded, with the tokens the endpoint reported.
    assert decision.context["messages"] == sent.messages
    assert decision.context["answers"][0]["tool_calls"][0]["function"]["name"] == "enrich"
    assert decision.context["tokens_estimated"] is False and decision.context["fallback"] is None
    assert decision.prompt_tokens > 0 and decision.completion_tokens > 0
    expected = (decision.prompt_tokens * 0.5 + decision.completion_tokens * 1.5) / 1000
    assert decision.cost_usd == pytest.approx(expected, abs=1e-6)


def test_the_context_says_goal_policy_and_what_remains(model: FakeModel) -> None:
    run = Run()
    run.done("enrich", {"domain": DOMAIN})
    decision = decider(llm_settings(model.url)).decide(run.snap)
    assert decision is not None and decision.step == "jira"
    system, user = model.requests[0].messages
    assert ONBOARDING.goal in system["content"] and "escalate" in system["content"]
    assert '"industry"' in user["content"]  # what enrich returned
    assert '"step": "jira"' in user["content"] and '"ready": true' in user["content"]


def test_malformed_json_is_repaired_in_one_more_turn(model: FakeModel) -> None:
    model.script(Answer.call("enrich", '{"domain": '))
    decision = decider(llm_settings(model.url)).decide(Run().snap)
    assert decision is not None and decision.action is DecisionAction.dispatch and decision.step == "enrich"
    assert model.calls == 2
    repair = model.requests[1].messages
    assert repair[-1]["role"] == "tool" and "not valid JSON" in repair[-1]["content"]
    assert repair[-2]["tool_calls"][0]["function"]["arguments"] == '{"domain": '
    assert "not valid JSON" in decision.context["refused"][0]
    assert len(decision.context["answers"]) == 2 and decision.context["messages"] == repair


def test_an_unknown_tool_twice_falls_back_to_the_rules_with_the_reason(model: FakeModel) -> None:
    model.script(Answer.call("crm_magic", {"x": 1}), Answer.call("crm_magic", {"x": 1}))
    decision = decider(llm_settings(model.url)).decide(Run().snap)
    assert decision is not None
    assert (decision.action, decision.step) == (DecisionAction.dispatch, "enrich")  # what the rules decide
    assert decision.arguments == {"domain": DOMAIN}
    assert model.calls == 2
    assert decision.reason.startswith("fallback to rules (answer refused twice: unknown tool 'crm_magic'")
    assert decision.context["fallback"] == "rules"
    assert "unknown tool" in decision.context["fallback_reason"]
    assert decision.prompt_tokens > 0  # the refused calls cost tokens all the same


def test_arguments_failing_the_schema_are_repaired(model: FakeModel) -> None:
    model.script(Answer.call("enrich", {"domain": 42}))
    decision = decider(llm_settings(model.url)).decide(Run().snap)
    assert decision is not None and decision.arguments == {"domain": DOMAIN}
    assert model.calls == 2
    assert "arguments refused" in decision.context["refused"][0] and "expected string" in decision.context["refused"][0]
    assert "expected string" in model.requests[1].messages[-1]["content"]


def test_a_step_the_workflow_forbids_now_is_refused(model: FakeModel) -> None:
    jira = {"key": "ACME1", "name": "x", "description": "y", "lead_email": "ada@acme-robotics.io"}
    model.script(Answer.call("jira", jira), Answer.call("complete"))
    decision = decider(llm_settings(model.url)).decide(Run().snap)
    assert decision is not None and decision.context["fallback"] == "rules"
    refused = decision.context["refused"]
    assert "needs enrich done first" in refused[0]
    assert "complete refused" in refused[1]


def test_the_model_down_falls_back_with_the_reason_and_no_exception() -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = llm_settings(f"http://127.0.0.1:{port}/v1", model_max_retries=1)
    decision = decider(settings).decide(Run().snap)
    assert decision is not None and decision.action is DecisionAction.dispatch and decision.step == "enrich"
    assert decision.reason.startswith("fallback to rules (model unavailable: cannot connect")
    assert "2 attempt(s)" in decision.reason
    escalating = decider(settings, replace(ONBOARDING, fallback="escalate")).decide(Run().snap)
    assert escalating is not None and escalating.action is DecisionAction.escalate
    assert "model unavailable" in escalating.reason and escalating.context["fallback"] == "escalate"


def _calls(outcome: str) -> float:
    return REGISTRY.get_sample_value("streamagent_model_calls_total", {"decider": "llm", "outcome": outcome}) or 0.0


def test_429_with_retry_after_is_honoured(model: FakeModel) -> None:
    errors, answered = _calls("error"), _calls("answered")
    model.script(Answer.error(429, retry_after=1), Answer.error(503))
    decision = decider(llm_settings(model.url)).decide(Run().snap)
    assert decision is not None and decision.step == "enrich" and decision.context["fallback"] is None
    assert model.calls == 3
    first, second, _ = model.requests
    assert second.at - first.at >= 1.0
    assert decision.context["http_attempts"] == 3
    assert (_calls("error") - errors, _calls("answered") - answered) == (2, 1)  # every HTTP request counted


def test_a_workflow_pinned_to_the_rules_is_not_asked(model: FakeModel, tmp_path: Path) -> None:
    source = Path(ONBOARDING.source)
    (tmp_path / "onboarding.toml").write_text('decider = "rules"\n' + source.read_text())
    crm = "onboarding-with-crm.toml"  # follows the setting: llm
    (tmp_path / crm).write_text((source.parent / crm).read_text())
    chosen = make_decider(llm_settings(model.url, workflows_dir=tmp_path))
    decision = chosen.decide(Run().snap)
    assert decision is not None and decision.decider == "rules" and decision.step == "enrich"
    assert model.calls == 0


def test_json_schema_style(model: FakeModel) -> None:
    settings = llm_settings(model.url, model_answer_style="json_schema")
    decision = decider(settings).decide(Run().snap)
    assert decision is not None and decision.step == "enrich" and decision.arguments == {"domain": DOMAIN}
    sent = model.requests[0]
    assert sent.tools == [] and sent.response_format is not None
    branches = sent.response_format["json_schema"]["schema"]["anyOf"]
    assert [b["properties"]["tool"]["const"] for b in branches][:5] == ["enrich", "jira", "draft", "email", "slack"]
    model.script(Answer.text("I think we should enrich first."))
    again = decider(settings).decide(Run().snap)
    assert again is not None and again.step == "enrich" and "not valid JSON" in again.context["refused"][0]


def test_json_object_style_for_llama_cpp_python(model: FakeModel) -> None:
    settings = llm_settings(model.url, model_answer_style="json_object")
    decision = decider(settings).decide(Run().snap)
    assert decision is not None and decision.step == "enrich" and decision.arguments == {"domain": DOMAIN}
    sent = model.requests[0].response_format
    assert sent is not None and sent["type"] == "json_object" and "json_schema" not in sent
    names = [b["properties"]["tool"]["const"] for b in sent["schema"]["anyOf"]]
    assert names[:5] == ["enrich", "jira", "draft", "email", "slack"]
    assert decision.context["answer_style"] == "json_object"


def test_tool_choice_is_a_setting(model: FakeModel) -> None:
    assert llm_settings(model.url).model_tool_choice == "required"
    decider(llm_settings(model.url)).decide(Run().snap)
    decider(llm_settings(model.url, model_tool_choice="auto")).decide(Run().snap)
    assert [r.body["tool_choice"] for r in model.requests] == ["required", "auto"]


def test_max_tokens_is_sent_only_when_set(model: FakeModel) -> None:
    decider(llm_settings(model.url)).decide(Run().snap)
    decider(llm_settings(model.url, model_max_tokens=512)).decide(Run().snap)
    assert ["max_tokens" in r.body for r in model.requests] == [False, True]
    assert model.requests[1].body["max_tokens"] == 512


def test_missing_usage_is_estimated_and_flagged(model: FakeModel) -> None:
    model.script(Answer.call("enrich", {"domain": DOMAIN}, usage=False))
    decision = decider(llm_settings(model.url)).decide(Run().snap)
    assert decision is not None and decision.context["tokens_estimated"] is True
    assert decision.prompt_tokens > 0 and decision.completion_tokens > 0


def test_wait_complete_and_what_needs_no_model(model: FakeModel) -> None:
    run = Run()
    unavailable = decider(llm_settings(model.url), available=lambda t: t != "enrich").decide(run.snap)
    assert unavailable is not None and (unavailable.action, unavailable.tool) == (DecisionAction.wait, "enrich")
    assert "enrich" not in model.requests[0].tools
    calls = model.calls
    run.dispatch("enrich", {"domain": DOMAIN})
    assert decider(llm_settings(model.url)).decide(run.snap) is None  # a command in flight: no call
    run.result("enrich", None, error="bad domain")
    failed = decider(llm_settings(model.url)).decide(run.snap)  # a failed step: the workflow's policy
    assert failed is not None and failed.action is DecisionAction.fail
    assert model.calls == calls
    done = Run()
    for step in ("enrich", "jira", "draft", "email", "slack"):
        decision = decider(llm_settings(model.url)).decide(done.snap)
        assert decision is not None and decision.step == step
        done.done(step, decision.arguments)
    final = decider(llm_settings(model.url)).decide(done.snap)
    assert final is not None and final.action is DecisionAction.complete


def test_the_llm_decider_without_an_endpoint_refuses_to_start() -> None:
    with pytest.raises(SettingsError, match=r"^STREAMAGENT_DECIDER=llm needs OPENAI_BASE_URL"):
        settings_from({"STREAMAGENT_DECIDER": "llm"})


def test_a_slow_model_times_out_into_the_fallback(model: FakeModel) -> None:
    model.script(Answer.slow(2.0))
    settings = llm_settings(model.url, model_timeout_s=0.5, model_max_retries=0)
    decision = decider(settings).decide(Run().snap)
    assert decision is not None and decision.step == "enrich"
    assert decision.reason.startswith("fallback to rules (model unavailable: no answer within 0.5")
    assert model.calls == 1


def test_openai_settings_come_from_their_usual_names(tmp_path: Path) -> None:
    settings = settings_from({"OPENAI_BASE_URL": "http://x/v1", "OPENAI_API_KEY": "sk-1", "STREAMAGENT_DECIDER": "llm"})
    assert settings.openai_base_url == "http://x/v1" and settings.openai_api_key.get_secret_value() == "sk-1"
    env = to_env(settings)
    assert env["OPENAI_BASE_URL"] == "http://x/v1" and "STREAMAGENT_OPENAI_BASE_URL" not in env
    assert settings_from(env) == settings
    with pytest.raises(SettingsError, match="STREAMAGENT_MODEL_PRICES"):
        settings_from({"STREAMAGENT_MODEL_PRICES": "{not json"})
    with pytest.raises(SettingsError, match="OPENAI_API_KEY and STREAMAGENT_OPENAI_API_KEY_FILE"):
        settings_from({"OPENAI_API_KEY": "a", "STREAMAGENT_OPENAI_API_KEY_FILE": str(tmp_path / "k")})


def test_a_workflow_names_its_decider_and_fallback(tmp_path: Path) -> None:
    text = Path(ONBOARDING.source).read_text()
    good = tmp_path / "onboarding.toml"
    good.write_text('decider = "llm"\nfallback = "escalate"\n' + text)
    workflow = load_workflow(good)
    assert (workflow.decider, workflow.fallback) == ("llm", "escalate")
    bad = tmp_path / "bad" / "onboarding.toml"
    bad.parent.mkdir()
    bad.write_text('fallback = "retry"\n' + text)
    with pytest.raises(WorkflowError, match="fallback: must be 'rules' or 'escalate'"):
        load_workflow(bad)
    # A workflow that asks for the model needs an endpoint even when the setting says rules.
    with pytest.raises(SettingsError, match="onboarding"):
        make_decider(Settings(workflows_dir=tmp_path))


def test_a_batch_decides_its_runs_at_once_and_redelivered_costs_no_call(settings: Settings, model: FakeModel) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    llm = settings.model_copy(
        update={"decider": "llm", "openai_base_url": model.url, "model": "test-model", "model_concurrency": 4}
    )

    def handler() -> DecisionHandler:
        chosen = make_decider(llm, check=catalogue_check(ENTRIES.get), entry_of=ENTRIES.get)
        return DecisionHandler(llm, chosen, LandingProducer())  # type: ignore[arg-type]

    model.script(*[Answer.slow(0.5) for _ in range(8)])
    snapshots = [Run(run_id=f"run-{i}").snap for i in range(8)]
    first = handler()
    started = time.monotonic()
    first(_batch(snapshots))
    elapsed = time.monotonic() - started
    assert model.calls == 8
    assert elapsed < 8 * 0.5 * 0.75, f"8 slow answers took {elapsed:.1f}s: not decided at once"
    sent = first.producer.sent  # type: ignore[attr-defined]
    commands = [codec.decode(v) for t, v in sent if t != settings.topic(RUN_EVENTS)]
    assert sorted(c.run_id for c in commands) == sorted(s.run_id for s in snapshots)
    assert all(isinstance(c, ToolCommand) and c.step == "enrich" for c in commands)
    records = [codec.decode(v) for t, v in sent if t == settings.topic(RUN_EVENTS)]
    assert {r.decider for r in records} == {"llm"}
    first(_batch(snapshots))  # redelivered: answered from memory
    handler()(_batch(snapshots))  # after a restart: answered from the table
    assert model.calls == 8


def test_the_model_is_shown_the_contact_memory_holds_and_its_decision_records_that_version(model: FakeModel) -> None:
    """Memory reaches the model as code prepared it: the email step's arguments are built from the contact
    memory holds, the entity is shown beside them, and the dispatch records the version the prompt showed."""
    from datetime import UTC, datetime

    from streamagent.events import EntityVersion

    contact = EntityVersion(
        entity="contact",
        key=DOMAIN,
        version=4,
        fields={"email": "grace@" + DOMAIN, "name": "Grace"},
        as_of=datetime(2026, 12, 6, tzinfo=UTC),
        writer="crm",
        write_id="w-4",
    )
    run = Run()
    run.dispatch("enrich", {"domain": DOMAIN})
    run.result("enrich", {"industry": "robotics", "employees": 120})
    run.dispatch("jira", {"key": "ACME1"})
    run.result("jira", {"id": "10001", "key": "ACME1"})
    run.dispatch("draft", {"company_name": "Acme Robotics"})
    run.result("draft", {"subject": "Welcome", "body": "Hello Grace", "drafted_by": "model"})
    chosen = LlmDecider(
        llm_settings(model.url),
        {ONBOARDING.name: ONBOARDING},
        lambda _t: True,
        catalogue_check(ENTRIES.get),
        ENTRIES.get,
        memory=lambda ref: contact if ref == f"contact/{DOMAIN}" else None,
    )
    model.script(Answer.call("email", {"to": "grace@" + DOMAIN, "subject": "Welcome", "body": "Hello Grace"}))
    decision = chosen.decide(run.snap)
    assert decision is not None and decision.step == "email"
    assert decision.memory == {f"contact/{DOMAIN}": 4}
    prompt = model.requests[0].messages[-1]["content"]
    remaining = json.loads(prompt.split("Remaining steps, in order (JSON):\n", 1)[1].split("\nDecide", 1)[0])
    (email,) = [s for s in remaining if s["step"] == "email"]
    assert email["arguments"]["to"] == "grace@" + DOMAIN and email["memory"][f"contact/{DOMAIN}"]["version"] == 4
