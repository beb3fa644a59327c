"""Tokens and cost per decision and per run, on the real PostgreSQL: the projection sums them
idempotently, and `runs` / `show` print them with what the model saw and answered."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from streamagent.processors.projection import queries
from streamagent.processors.projection.processor import ProjectionHandler
from streamagent.processors.projection.schema import SCHEMA

from streamagent import codec, db
from streamagent.config import Settings, get_settings
from streamagent.console import cli
from streamagent.events import DecisionAction, DecisionRecorded, Event, RunRequested, ToolResult, ToolStatus
from streamagent.runtime import Batch, Incoming
from streamagent.topics import RUN_EVENTS, TOOL_RESULTS

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
RUN = "run-costs"
SYSTEM_PROMPT = "You decide the next step of an onboarding run. Answer with one tool call."
LONG_RESULT = "enrich returned: " + "x" * 2000  # longer than show trims to without --full


class Consumed:
    """Stands in for a consumed Kafka message: the projection reads only its topic, partition and offset."""

    def __init__(self, topic: str, offset: int) -> None:
        self._topic, self._offset = topic, offset

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def batch(settings: Settings, events: list[Event]) -> Batch:
    # Through the codec, as the runtime hands them over: the context must survive the wire format.
    items = []
    for offset, event in enumerate(events):
        topic = settings.topic(TOOL_RESULTS if isinstance(event, ToolResult) else RUN_EVENTS)
        items.append(Incoming(Consumed(topic, offset), codec.decode(codec.encode(event))))  # type: ignore[arg-type]
    return Batch(items, sink=None)  # type: ignore[arg-type]


def requested(run_id: str) -> RunRequested:
    return RunRequested(
        event_id=f"req-{run_id}",
        run_id=run_id,
        occurred_at=T0,
        company_name="Acme Robotics",
        company_domain="acme-robotics.io",
        contact_name="Ada Lovelace",
        contact_email="ada@acme-robotics.io",
        requested_by="crm",
    )


def decided(
    run_id: str,
    version: int,
    step: str | None,
    decider: str,
    prompt: int = 0,
    completion: int = 0,
    cost: float = 0.0,
    context: dict[str, Any] | None = None,
) -> DecisionRecorded:
    return DecisionRecorded(
        event_id=f"dec-{run_id}-{version}",
        run_id=run_id,
        occurred_at=T0 + timedelta(milliseconds=100 * version),
        decision_id=f"dec-{run_id}-{version}",
        based_on_version=version,
        action=DecisionAction.dispatch if step else DecisionAction.complete,
        step=step,
        tool=step,
        reason=f"{step or 'all'} next",
        decider=decider,
        context=context or {},
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=cost,
    )


def model_run(run_id: str = RUN) -> list[Event]:
    """Two model decisions (one with tokens counted locally) and one by the rules."""
    first = {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "Goal: onboard Acme Robotics. Done: nothing yet."},
        ],
        "answer": {"tool": "enrich", "arguments": {"domain": "acme-robotics.io"}},
    }
    second = {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": LONG_RESULT},
        ],
        "answers": ["not json at all", {"tool": "jira", "arguments": {"key": "ACME"}}],
        "tokens_estimated": True,
        "validation_error": "answer 1: not a JSON object",
    }
    return [
        requested(run_id),
        decided(run_id, 1, "enrich", "llm:qwen2.5", 1200, 40, 0.00031, first),
        decided(run_id, 2, "jira", "llm:qwen2.5", 1350, 55, 0.00042, second),
        decided(run_id, 3, "email", "rules"),
    ]


@pytest.fixture
def projection(settings: Settings) -> ProjectionHandler:
    db.migrate(settings, SCHEMA)
    return ProjectionHandler(settings)


def test_a_run_sums_its_decisions_and_a_redelivered_batch_changes_nothing(
    settings: Settings, projection: ProjectionHandler
) -> None:
    events = model_run()
    projection(batch(settings, events))
    row = queries.run(settings, RUN)
    assert row is not None
    assert (row.prompt_tokens, row.completion_tokens) == (2550, 95)
    assert row.cost_usd == pytest.approx(0.00073)
    assert row.model_decisions == 2 and row.estimated_decisions == 1

    projection(batch(settings, events))  # the same batch again, as after a crash before the commit
    projection(batch(settings, events[2:]))  # and a part of it in another batch
    again = queries.run(settings, RUN)
    assert again == row

    rules_only = [requested("run-rules"), decided("run-rules", 1, "enrich", "rules")]
    projection(batch(settings, rules_only))
    plain = queries.run(settings, "run-rules")
    assert plain is not None and (plain.tokens, plain.cost_usd, plain.model_decisions) == (0, 0.0, 0)


def test_a_later_decision_adds_to_the_run_total(settings: Settings, projection: ProjectionHandler) -> None:
    events = model_run()
    projection(batch(settings, events[:2]))
    assert (r := queries.run(settings, RUN)) is not None and r.prompt_tokens == 1200 and r.model_decisions == 1
    projection(batch(settings, events[2:]))
    assert (r := queries.run(settings, RUN)) is not None and r.prompt_tokens == 2550 and r.model_decisions == 2


@pytest.fixture
def cli_on(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The in-process CLI pointed at this test's database (and nothing else)."""
    for key in list(os.environ):
        if key.startswith("STREAMAGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("STREAMAGENT_DATA_DIR", str(tmp_path / "cli-data"))
    monkeypatch.setenv("STREAMAGENT_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_runs_lists_tokens_and_cost(
    settings: Settings, projection: ProjectionHandler, cli_on: None, capsys: pytest.CaptureFixture[str]
) -> None:
    projection(batch(settings, model_run()))
    projection(batch(settings, [requested("run-rules"), decided("run-rules", 1, "enrich", "rules")]))

    listed = {r["run_id"]: r for r in json.loads(run_cli(["runs", "--json"], capsys))}
    assert listed[RUN]["prompt_tokens"] == 2550 and listed[RUN]["completion_tokens"] == 95
    assert listed[RUN]["cost_usd"] == pytest.approx(0.00073)
    assert listed[RUN]["model_decisions"] == 2 and listed[RUN]["estimated_decisions"] == 1
    assert listed["run-rules"]["cost_usd"] == 0 and listed["run-rules"]["model_decisions"] == 0

    lines = run_cli(["runs"], capsys).splitlines()
    assert "tokens" in lines[0] and "cost" in lines[0]
    assert all(len(line) <= 120 for line in lines)
    model_line = next(line for line in lines if line.startswith(RUN))
    assert "~2645" in model_line and "$0.0007" in model_line  # ~: partly a local estimate
    rules_line = next(line for line in lines if line.startswith("run-rules"))
    assert rules_line.split()[-2:] == ["-", "-"]


def test_show_prints_each_decisions_cost_the_run_total_and_what_the_model_saw(
    settings: Settings, projection: ProjectionHandler, cli_on: None, capsys: pytest.CaptureFixture[str]
) -> None:
    projection(batch(settings, model_run()))

    out = run_cli(["show", RUN], capsys)
    decisions = [line for line in out.splitlines() if "DecisionRecorded" in line]
    assert len(decisions) == 3
    assert "[llm:qwen2.5]" in decisions[0] and "1200+40 tokens $0.0003" in decisions[0]
    assert "~1350+55 tokens $0.0004" in decisions[1]
    assert "[rules]" in decisions[2] and "tokens" not in decisions[2]  # a rules decision reads as before
    assert "total: 2 model decision(s), 2,550 prompt + 95 completion tokens (estimated in 1), $0.0007" in out
    assert SYSTEM_PROMPT not in out  # the messages only with --context

    out = run_cli(["show", RUN, "--context"], capsys)
    assert out.count(f"system: {SYSTEM_PROMPT}") == 2
    assert "user: Goal: onboard Acme Robotics. Done: nothing yet." in out
    assert '"tool": "enrich"' in out  # what it answered
    assert "answer 1/2: not json at all" in out and "answer 2/2:" in out and '"jira"' in out
    assert "validation_error: answer 1: not a JSON object" in out
    assert LONG_RESULT not in out and "more chars; --full shows all]" in out

    out = run_cli(["show", RUN, "--context", "--full"], capsys)
    assert f"user: {LONG_RESULT}" in out

    shown = json.loads(run_cli(["show", RUN, "--json"], capsys))
    assert shown["run"]["prompt_tokens"] == 2550 and shown["run"]["model_decisions"] == 2
    contexts = [e["payload"]["context"] for e in shown["timeline"] if e["type"] == "DecisionRecorded"]
    assert contexts[0]["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}


def test_show_of_a_rules_run_has_no_cost_lines(
    settings: Settings, projection: ProjectionHandler, cli_on: None, capsys: pytest.CaptureFixture[str]
) -> None:
    done = ToolResult(
        run_id="run-rules",
        occurred_at=T0 + timedelta(milliseconds=150),
        command_id="cmd-1",
        tool="enrich",
        step="enrich",
        status=ToolStatus.succeeded,
    )
    projection(batch(settings, [requested("run-rules"), decided("run-rules", 1, "enrich", "rules"), done]))
    out = run_cli(["show", "run-rules", "--context"], capsys)
    assert "steps done=1/5" in out and "ToolResult           enrich" in out
    assert "total:" not in out and "tokens" not in out
    assert len(out.splitlines()) == 4  # header and three events: no context for a rules decision


def test_context_of_any_shape_prints() -> None:
    from streamagent.console.timeline import context_lines

    lines = context_lines(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "enrich"}}]},
                {"role": "tool", "name": "enrich", "content": "line 1\nline 2"},
            ],
            "fallback": "rules: the model timed out twice",
        }
    )
    text = "\n".join(lines)
    assert "user: part one\n" in text and "two" in text
    assert 'assistant: tool_calls: [{"function": {"name": "enrich"}}]' in text
    assert "tool (enrich): line 1\n" in text and lines[4] == " " * 18 + "line 2"  # continued, indented
    assert lines[-1].strip() == "fallback: rules: the model timed out twice"
    # A context this version cannot lay out is printed as it is rather than failing `show`.
    assert "context:" in context_lines({"messages": "by-hash:ab12"})[0]
