"""A run decided `wait` for a missing tool is decided again, once, when the tool becomes available."""

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
from streamagent.events import DecisionAction, DecisionRecorded, StepStatus, ToolCommand


def decoded(producer: LandingProducer) -> list[object]:
    return [codec.decode(v) for _, v in producer.sent]


def test_a_waiting_run_is_woken_once_its_tool_is_available_and_the_state_takes_the_new_decision(
    settings: Settings,
) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    present: set[str] = set()
    producer = LandingProducer()
    decider = RulesDecider(ONBOARDING, available=lambda tool: tool in present)
    handler = DecisionHandler(settings, decider, producer)  # type: ignore[arg-type]
    state = apply(None, requested(event_id="req-wake", run_id="run-wake"), DEFAULT_DEADLINE_S).state
    snap = state.snapshot

    handler(_batch([snap]))
    (wait,) = decoded(producer)
    assert isinstance(wait, DecisionRecorded) and wait.action is DecisionAction.wait
    assert wait.reason == "waiting for tool enrich" and wait.based_on_version == snap.version
    assert handler.wake() == 0  # still not there: nothing decided, the run still waits
    assert handler.waiting == {"enrich"}  # the index only: the run and its snapshot are in the table
    with db.connect(settings) as conn:
        row = conn.execute(
            "SELECT tool, based_on_version, snapshot FROM decision_waits WHERE run_id = 'run-wake'"
        ).fetchone()
    assert row is not None and row[:2] == ("enrich", snap.version) and codec.decode(bytes(row[2])) == snap

    producer.sent.clear()
    present.add("enrich")
    assert handler.wake() == 1
    record, command = sorted(decoded(producer), key=lambda e: type(e).__name__)
    assert isinstance(command, ToolCommand) and command.tool == "enrich"
    assert isinstance(record, DecisionRecorded) and record.action is DecisionAction.dispatch
    # The decision of the state the run has after its wait: version v+1, the wait as its last decision.
    assert record.based_on_version == snap.version + 1 and record.causation_id == wait.event_id
    producer.sent.clear()
    assert handler.wake() == 0 and handler.waiting == set()  # once: nothing decided twice
    assert producer.sent == []

    # The state processor folds the wait into exactly that version, then takes the dispatch.
    folded = apply(state, wait, DEFAULT_DEADLINE_S)
    assert not folded.publish  # a recorded wait asks for no decision: hence the wake
    assert folded.state.snapshot.version == record.based_on_version
    assert folded.state.snapshot.last_decision_id == wait.decision_id
    taken = apply(folded.state, record, DEFAULT_DEADLINE_S).state.snapshot
    assert taken.step("enrich").status is StepStatus.dispatched and taken.reason is None

    # One decision per (run, version): both are stored, the wait for v and the dispatch for v+1.
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT based_on_version, action FROM decisions WHERE run_id = 'run-wake' ORDER BY 1"
        ).fetchall()
    assert rows == [(snap.version, "wait"), (snap.version + 1, "dispatch")]
    # ...and the dispatch's own statement deleted the wait's row: the run waits no more.
    with db.connect(settings) as conn:
        assert conn.execute("SELECT count(*) FROM decision_waits").fetchone() == (0,)

    # The folded snapshot v+1 delivered later (a rebalance) replays the recorded dispatch.
    producer.sent.clear()
    handler(_batch([folded.state.snapshot]))
    assert [e.event_id for e in decoded(producer) if isinstance(e, DecisionRecorded)] == [record.event_id]  # type: ignore[attr-defined]


def test_a_restarted_handler_wakes_a_run_whose_wait_it_replays(settings: Settings) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    present: set[str] = set()
    decider = RulesDecider(ONBOARDING, available=lambda tool: tool in present)
    first = DecisionHandler(settings, decider, LandingProducer())  # type: ignore[arg-type]
    snap = apply(None, requested(event_id="req-wake2", run_id="run-wake2"), DEFAULT_DEADLINE_S).state.snapshot
    first(_batch([snap]))

    producer = LandingProducer()
    second = DecisionHandler(settings, decider, producer)  # type: ignore[arg-type]
    second(_batch([snap]))  # redelivered after a restart: the recorded wait replayed, and remembered
    present.add("enrich")
    assert second.wake() == 1
    assert any(isinstance(e, ToolCommand) for e in decoded(producer))
