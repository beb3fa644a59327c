"""What the decision processor reports of a model's decisions: decisions by action and decider, tokens
and cost counted once (never again for a redelivered snapshot), and a span per decision with the model
call as its child, carrying the GenAI semantic-convention attributes."""

from __future__ import annotations

import pytest
from llm_runs import DOMAIN, Run
from prometheus_client import REGISTRY
from streamagent.processors.decision.arguments import catalogue_check
from streamagent.processors.decision.processor import DecisionHandler, make_decider
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.tools.sandbox.model import Answer, FakeModel
from test_decision_handler import LandingProducer, _batch
from test_llm_decider import ENTRIES, PRICES

from streamagent import codec, db, tracing
from streamagent.config import Settings
from streamagent.events import DecisionRecorded
from streamagent.topics import RUN_EVENTS


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_model_decisions_are_counted_once_and_traced(settings: Settings) -> None:
    pytest.importorskip("opentelemetry.sdk")
    import json

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    db.migrate(settings, DECISION_SCHEMA)
    with FakeModel() as model:
        llm = settings.model_copy(
            update={
                "decider": "llm",
                "openai_base_url": model.url,
                "model": "test-model",
                "model_prices": json.dumps(PRICES),
                "model_concurrency": 2,
            }
        )
        chosen = make_decider(llm, check=catalogue_check(ENTRIES.get), entry_of=ENTRIES.get)
        handler = DecisionHandler(llm, chosen, LandingProducer())  # type: ignore[arg-type]
        model.script(*[Answer.call("enrich", {"domain": DOMAIN}) for _ in range(2)])
        snapshots = [Run(run_id=f"obs-{i}").snap for i in range(2)]
        before = {
            "dispatch": _value("streamagent_decision_actions_total", decider="llm", action="dispatch"),
            "prompt": _value("streamagent_model_tokens_total", decider="llm", kind="prompt"),
            "completion": _value("streamagent_model_tokens_total", decider="llm", kind="completion"),
            "cost": _value("streamagent_model_cost_usd_total", decider="llm"),
            "calls": _value("streamagent_model_call_seconds_count", decider="llm"),
        }
        exporter = InMemorySpanExporter()
        tracing.configure(settings, "decision", exporter=exporter)
        try:
            handler(_batch(snapshots))
            handler(_batch(snapshots))  # redelivered: answered from memory, no call, nothing counted again
        finally:
            tracing.shutdown()
        assert model.calls == 2

    sent = handler.producer.sent  # type: ignore[attr-defined]
    records = [
        r for t, v in sent if t == settings.topic(RUN_EVENTS) and isinstance(r := codec.decode(v), DecisionRecorded)
    ]
    records = list({r.decision_id: r for r in records}.values())
    assert len(records) == 2 and all(r.prompt_tokens and r.completion_tokens and r.cost_usd for r in records)
    after = {
        "dispatch": _value("streamagent_decision_actions_total", decider="llm", action="dispatch"),
        "prompt": _value("streamagent_model_tokens_total", decider="llm", kind="prompt"),
        "completion": _value("streamagent_model_tokens_total", decider="llm", kind="completion"),
        "cost": _value("streamagent_model_cost_usd_total", decider="llm"),
        "calls": _value("streamagent_model_call_seconds_count", decider="llm"),
    }
    assert after["dispatch"] - before["dispatch"] == 2
    assert after["prompt"] - before["prompt"] == sum(r.prompt_tokens for r in records)
    assert after["completion"] - before["completion"] == sum(r.completion_tokens for r in records)
    assert after["cost"] - before["cost"] == pytest.approx(sum(r.cost_usd for r in records))
    assert after["calls"] - before["calls"] == 2

    spans = exporter.get_finished_spans()
    decisions = {s.attributes["streamagent.run_id"]: s for s in spans if s.name == "decision"}
    assert set(decisions) == {"obs-0", "obs-1"}  # the redelivery made no decision, so no span
    for run_id, decision in decisions.items():
        assert decision.context.trace_id == tracing.run_trace_id(run_id)
        assert decision.parent is not None and decision.parent.span_id == tracing.run_span_id(run_id)
        assert decision.attributes["streamagent.decision.action"] == "dispatch"
        assert decision.attributes["streamagent.decision.tool"] == "enrich"
        assert decision.attributes["streamagent.guard.outcome"] == "allowed"
        (chat,) = [s for s in spans if s.parent is not None and s.parent.span_id == decision.context.span_id]
        assert chat.name == "chat test-model"
        assert chat.context.trace_id == tracing.run_trace_id(run_id)
        record = next(r for r in records if r.run_id == run_id)
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.system"] == "openai"
        assert chat.attributes["gen_ai.request.model"] == "test-model"
        assert chat.attributes["gen_ai.usage.input_tokens"] == record.prompt_tokens
        assert chat.attributes["gen_ai.usage.output_tokens"] == record.completion_tokens
