"""The walking skeleton on the real broker and PostgreSQL: 20 onboarding runs, end to end, traced (to an
OTLP/HTTP stub) and measured (each process's metrics endpoint)."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import ended, eventually
from otlp_receiver import otlp_receiver
from streamagent.processors.projection import queries
from streamagent.processors.workflow import project_key
from streamagent.tools.sandbox import SandboxClient

from streamagent import tracing
from streamagent.config import Settings, get_settings
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.events import RunRequested
from streamagent.metrics import scrape
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

STEPS = ["enrich", "jira", "draft", "email", "slack"]
# The steps that call a SaaS API (the draft, with no model configured, calls none: the template is sent).
APIS = ["enrich", "jira", "email", "slack"]


def test_twenty_runs_complete_with_one_effect_per_step(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = sample_requests(20)
    with otlp_receiver() as receiver, Stack(settings.model_copy(update={"otlp_endpoint": receiver.url})) as stack:
        s = stack.settings
        run_ids = produce_requests(s, requests)
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="all 20 runs ended")
        assert Counter(r.status for r in rows) == {"completed": 20}
        assert all(r.steps_done == 5 for r in rows)

        effects = SandboxClient(s.sandbox_url).effects()
        by_api = Counter(e.api for e in effects)
        assert by_api == {"enrich": 20, "jira": 20, "email": 20, "slack": 20}
        for request in requests:
            _assert_effects_of(request, [e for e in effects if e.run_id == request.run_id])

        for request in requests:
            entries = queries.timeline(s, request.run_id)
            types = [e.type for e in entries]
            assert types[0] == "RunRequested" and "RunCompleted" in types
            results = [e.step for e in entries if e.type == "ToolResult"]
            assert results == STEPS, f"steps out of order for {request.run_id}: {results}"
            # No model is configured: the welcome email is the workflow's template, and the draft says why.
            (drafted,) = [e.payload for e in entries if e.type == "ToolResult" and e.step == "draft"]
            assert drafted["output"]["drafted_by"] == "template" and drafted["prompt_tokens"] == 0
            assert drafted["output"]["fallback_reason"] == "no model configured (OPENAI_BASE_URL is empty)"
            # Every decision and command is caused by the event before it in the chain.
            ids = {e.event_id for e in entries}
            assert all(e.causation_id in ids for e in entries if e.type != "RunRequested")

        # `streamagent show` prints the same steps, in order.
        capsys.readouterr()
        monkeypatch.setenv("STREAMAGENT_DATABASE_URL", s.database_url)
        get_settings.cache_clear()
        try:
            assert cli(["show", requests[0].run_id]) == 0
        finally:
            get_settings.cache_clear()
        out = capsys.readouterr().out
        positions = [out.index(f"ToolResult           {step}") for step in STEPS]
        assert positions == sorted(positions)
        assert "status=completed" in out

        # Each process's metrics: every run's end counted once, every step's latency, every group's lag.
        state = int((s.data_dir / "metrics" / "processor-state.port").read_text())
        assert scrape(state, "streamagent_runs_total", {"status": "completed"}) == 20
        assert scrape(state, "streamagent_run_seconds_count", {"status": "completed"}) == 20
        for step in STEPS:
            assert scrape(state, "streamagent_step_seconds_count", {"step": step, "status": "succeeded"}) == 20
        jira = int((s.data_dir / "metrics" / "tool-jira.port").read_text())
        assert scrape(jira, "streamagent_tool_call_attempts_count", {"tool": "jira"}) == 20
        assert scrape(jira, "streamagent_hop_seconds_count", {"processor": "tool.jira"}) == 20
        eventually(
            lambda: scrape(jira, "streamagent_consumer_lag", {"group": s.group("tool.jira")}) is not None,
            timeout=30,
            what="the jira group's lag reported",
        )

    # The stack stopped its processes gracefully, and each exported its last spans on the way out. A run
    # is one trace across five processes, with no context carried in the events: its root from the state
    # processor, a span per decision and per tool call, each parented on the root.
    assert receiver.paths == {"/v1/traces"}
    for request in requests:
        spans = receiver.spans(tracing.run_trace_id(request.run_id))
        names = Counter((span.service, span.name) for span in spans)
        assert names[("streamagent-processor-state", "run")] == 1, names
        assert names[("streamagent-processor-decision", "decision")] == 6, names  # 5 dispatches, 1 completion
        for step in STEPS:
            assert names[(f"streamagent-tool-{step}", f"tool {step}")] == 1, names
        (root,) = [span for span in spans if span.name == "run"]
        assert (root.span_id, root.parent_id) == (tracing.run_span_id(request.run_id), 0)
        assert all(span.parent_id == root.span_id for span in spans if span is not root)


def _assert_effects_of(request: RunRequested, effects: list) -> None:  # type: ignore[type-arg]
    by_api = {e.api: e for e in effects}
    assert sorted(by_api) == sorted(APIS) and len(effects) == 4
    key = project_key(request.company_name, request.run_id)
    assert by_api["enrich"].request["domain"] == request.company_domain
    jira = by_api["jira"].request
    assert jira["key"] == key and request.company_name in jira["name"]
    industry = by_api["enrich"].response["industry"]
    assert industry in jira["description"]
    mail = by_api["email"].request
    assert mail["personalizations"][0]["to"][0]["email"] == request.contact_email
    body = mail["content"][0]["value"]
    assert key in body and body.startswith(f"Hello {request.contact_name},\n\nWelcome aboard!")
    text = by_api["slack"].request["text"]
    assert key in text and industry in text and by_api["email"].response["message_id"] in text
    # The command id is the idempotency key every API call carried.
    assert len({e.idempotency_key for e in effects}) == 4
