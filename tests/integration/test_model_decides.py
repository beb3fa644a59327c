"""The model decides whole runs on the real stack; one model call per recorded model decision.

The fake model (tools/sandbox/model.py) is the only stand-in: it answers each step the workflow's
next one, read from the context the decider prepared, and counts the calls.
"""

from __future__ import annotations

import socket
from collections import Counter

import psycopg
import pytest
from helpers import ended, eventually, read_topic
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import SandboxClient
from streamagent.tools.sandbox.model import PLAN, FakeModel

from streamagent import codec
from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.console.timeline import plan_of
from streamagent.events import DecisionRecorded, StateSnapshot
from streamagent.submit import produce_requests
from streamagent.topics import RUN_STATE

pytestmark = pytest.mark.integration


def decisions(settings: Settings) -> list[DecisionRecorded]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT decision_event FROM decisions ORDER BY run_id, based_on_version").fetchall()
    out = [codec.decode(bytes(row[0])) for row in rows]
    assert all(isinstance(d, DecisionRecorded) for d in out)
    return out  # type: ignore[return-value]


def by_model(records: list[DecisionRecorded]) -> list[DecisionRecorded]:
    return [d for d in records if d.context.get("messages")]


def planner_calls(model: FakeModel) -> int:
    """Requests with no tools and no answer format: the planner's (the fake answers them PLAN)."""
    return sum(1 for r in model.requests if not r.tools and r.response_format is None)


def test_runs_decided_by_the_model_with_one_call_per_decision(settings: Settings) -> None:
    with FakeModel() as model:
        llm = settings.model_copy(
            update={"decider": "llm", "openai_base_url": model.url, "model": "fake-model", "planner": True}
        )
        with Stack(llm) as stack:
            s = stack.settings
            run_ids = produce_requests(s, sample_requests(3))
            rows = eventually(lambda: ended(s, run_ids), timeout=120, what="3 runs decided by the model ended")
            assert Counter(r.status for r in rows) == {"completed": 3}

            records = decisions(s)
            assert {d.decider for d in records} == {"llm"}
            assert all(d.context.get("fallback") is None for d in records)
            decided = by_model(records)
            # Every decision of a run was the model's: 5 dispatches and the completion (waits for a tool
            # not yet announced at start are model decisions too).
            assert len(decided) == len(records)
            assert Counter(d.action.value for d in decided)["dispatch"] == 15
            # The model decided that the mail be drafted; the draft tool asked it to write it (apart).
            assert len(model.drafts) == 3
            assert Counter(d.action.value for d in decided)["complete"] == 3
            for d in decided:
                assert d.context["messages"][0]["role"] == "system" and d.context["answers"]
                assert d.prompt_tokens > 0 and d.context["model"] == "fake-model"
            # One plan per run, folded into its state from the decision that recorded it, and shown.
            assert planner_calls(model) == 3
            assert model.calls == len(decided) + 3
            assert {r.model for r in model.requests} == {"fake-model"}
            first = {d.run_id: d for d in reversed(decided)}
            assert all(first[d.run_id] is d or d.context["plan"]["carried"] is False for d in decided)
            snapshots = [codec.decode(m.value()) for m in read_topic(s, s.topic(RUN_STATE))]
            last: dict[str, StateSnapshot] = {}
            for snap in snapshots:
                assert isinstance(snap, StateSnapshot)
                if snap.run_id not in last or snap.version > last[snap.run_id].version:
                    last[snap.run_id] = snap
            for run_id in run_ids:
                plan = last[run_id].plan
                assert plan is not None and plan.plan == PLAN and plan.decision_id == first[run_id].decision_id
                assert plan_of(queries.timeline(s, run_id)) == plan  # what `streamagent show` prints
            assert Counter(e.api for e in SandboxClient(s.sandbox_url).effects()) == {
                "enrich": 3,
                "jira": 3,
                "email": 3,
                "slack": 3,
            }

            # A crashed decision processor re-reads snapshots it may have decided: recorded decisions
            # are reused, so the restart costs no model call.
            stack.kill("processor-decision")
            more = produce_requests(s, sample_requests(1))
            eventually(lambda: ended(s, more), timeout=120, what="the run after the restart ended")
            assert model.calls == len(by_model(decisions(s))) + planner_calls(model)
            assert planner_calls(model) == 4


def test_the_model_down_for_the_whole_run_falls_back_to_the_rules(settings: Settings) -> None:
    with socket.socket() as s:  # a port nobody listens on: every call is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = settings.model_copy(
        update={"decider": "llm", "openai_base_url": f"http://127.0.0.1:{port}/v1", "model_max_retries": 1}
    )
    with Stack(down) as stack:
        s = stack.settings
        run_ids = produce_requests(s, sample_requests(2))
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="2 runs decided by the fallback ended")
        assert Counter(r.status for r in rows) == {"completed": 2}
        records = decisions(s)
        assert records and {d.decider for d in records} == {"llm"}
        for d in records:
            assert d.context["fallback"] == "rules", d.reason
            assert d.reason.startswith("fallback to rules (model unavailable: cannot connect")
            assert d.context["answers"] == [] and d.prompt_tokens == 0
