"""A wait is recorded like any decision (stored, on the run's log) and sends nothing to any tool."""

from __future__ import annotations

from streamagent.processors.decision.processor import DecisionHandler
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.state.fold import apply
from streamagent.processors.workflow import ONBOARDING
from test_decision_handler import LandingProducer, _batch
from test_fold import DEFAULT_DEADLINE_S, requested

from streamagent import codec, db
from streamagent.config import Settings
from streamagent.events import DecisionAction, DecisionRecorded
from streamagent.topics import RUN_EVENTS


def test_a_wait_is_stored_and_recorded_with_its_reason_and_produces_no_command(settings: Settings) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    producer = LandingProducer()
    decider = RulesDecider(ONBOARDING, available=lambda tool: tool != "enrich")
    handler = DecisionHandler(settings, decider, producer)  # type: ignore[arg-type]
    snap = apply(None, requested(event_id="req-w", run_id="run-wait"), DEFAULT_DEADLINE_S).state.snapshot

    handler(_batch([snap]))
    assert [t for t, _ in producer.sent] == [settings.topic(RUN_EVENTS)]  # the decision only: no command
    (record,) = [codec.decode(v) for _, v in producer.sent]
    assert isinstance(record, DecisionRecorded)
    assert record.action is DecisionAction.wait and record.reason == "waiting for tool enrich"
    assert record.command_id is None and record.step == "enrich"
    with db.connect(settings) as conn:
        row = conn.execute("SELECT action, follow_up_topic FROM decisions WHERE run_id = 'run-wait'").fetchone()
    assert row == ("wait", None)

    producer.sent.clear()
    handler(_batch([snap]))  # redelivered: the recorded wait again, nothing decided anew
    assert [codec.decode(v).event_id for _, v in producer.sent] == [record.event_id]  # type: ignore[attr-defined]
