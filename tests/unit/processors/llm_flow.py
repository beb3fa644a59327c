"""A model-decided run driven through the real decision handler on PostgreSQL: each recorded decision
is folded back into the run with its tool's result, as the state processor would, so the next
snapshot is the one the handler expects. For the planner's and the caps' tests."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from llm_runs import Run, entries, output_of
from streamagent.processors.decision.arguments import catalogue_check
from streamagent.processors.decision.llm.decider import LlmDecider
from streamagent.processors.decision.processor import DecisionHandler
from streamagent.processors.workflow import Workflow
from test_decision_handler import LandingProducer, _batch

from streamagent import codec
from streamagent.config import Settings
from streamagent.events import DecisionAction, DecisionRecorded, ToolResult, ToolStatus
from streamagent.topics import RUN_EVENTS

PRICES = {"test-model": {"prompt": 0.5, "completion": 1.5}, "planner-model": {"prompt": 5.0, "completion": 15.0}}
ENTRIES = entries()


def model_settings(settings: Settings, url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_base_url": url,
        "model": "test-model",
        "planner_model": "planner-model",
        "model_timeout_s": 5.0,
        "model_max_retries": 0,
        "model_prices": json.dumps(PRICES),
        **overrides,
    }
    return settings.model_copy(update=values)


def llm(settings: Settings, workflow: Workflow) -> LlmDecider:
    return LlmDecider(settings, {workflow.name: workflow}, lambda _t: True, catalogue_check(ENTRIES.get), ENTRIES.get)


def handler(settings: Settings, workflow: Workflow) -> DecisionHandler:
    return DecisionHandler(settings, llm(settings, workflow), LandingProducer())  # type: ignore[arg-type]


def decide(h: DecisionHandler, run: Run) -> DecisionRecorded:
    """The handler decides the run's current snapshot; returns the DecisionRecorded it emitted."""
    producer = h.producer
    before = len(producer.sent)  # type: ignore[attr-defined]
    h(_batch([run.snap]))
    events = h.settings.topic(RUN_EVENTS)
    records = [codec.decode(v) for t, v in producer.sent[before:] if t == events]  # type: ignore[attr-defined]
    decided = [r for r in records if isinstance(r, DecisionRecorded)]
    assert len(decided) == 1, records
    return decided[0]


def follow(run: Run, record: DecisionRecorded) -> None:
    """Fold ``record`` into the run and, for a command, its tool's successful result."""
    run._apply(record)
    if record.action is DecisionAction.dispatch:
        assert record.step is not None and record.tool is not None and record.command_id is not None
        run._apply(
            ToolResult(
                event_id=f"res-{record.step}",
                run_id=run.snap.run_id,
                occurred_at=run.clock,
                command_id=record.command_id,
                tool=record.tool,
                step=record.step,
                status=ToolStatus.succeeded,
                output=output_of(record.step, record.arguments),
            )
        )


def dead_url() -> str:
    """An endpoint nobody listens on: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def workflow_file(tmp_path: Path, source: str, header: str) -> Path:
    path = tmp_path / Path(source).name
    path.write_text(header + Path(source).read_text())
    return path
