"""The projection handler on the real PostgreSQL, fed the batches the consumer runtime would give it.

Events are produced to the real broker with the codec and consumed back, so each batch item carries a
real consumed message (topic, partition, offset, key, value) and the event decoded from its bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import Producer
from helpers import read_topic
from pydantic import BaseModel
from streamagent.processors.projection import queries
from streamagent.processors.projection.processor import ProjectionHandler, summarize
from streamagent.processors.projection.schema import SCHEMA

from streamagent import codec, db
from streamagent.config import Settings
from streamagent.dlq import DeadLetterSink
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    Event,
    FailureStatus,
    OnboardingRequest,
    RunCompleted,
    RunFailed,
    RunRequested,
    RunStatus,
    StateSnapshot,
    ToolCommand,
    ToolResult,
    ToolStatus,
)
from streamagent.kafka import create_topics
from streamagent.kafka import producer as make_producer
from streamagent.runtime import Batch, Incoming
from streamagent.topics import RUN_EVENTS, RUN_STATE, TOOL_RESULTS, all_topics, command_topic

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
TOOLS = ("enrich", "crm")


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def requested(run: str, t: int = 0) -> RunRequested:
    return RunRequested(
        event_id=f"{run}-req",
        run_id=run,
        occurred_at=at(t),
        company_name=f"Acme {run}",
        company_domain="acme-robotics.io",
        contact_name="Ada Lovelace",
        contact_email="ada@acme-robotics.io",
        requested_by="crm-webhook",
        workflow="onboarding",
    )


def decided(run: str, t: int, action: DecisionAction, step: str | None, reason: str = "") -> DecisionRecorded:
    return DecisionRecorded(
        event_id=f"{run}-dec-{t}",
        run_id=run,
        occurred_at=at(t),
        decision_id=f"{run}-dec-{t}",
        based_on_version=t,
        action=action,
        step=step,
        tool=step,
        command_id=f"{run}-cmd-{step}" if action is DecisionAction.dispatch else None,
        reason=reason or f"{action.value} {step}",
        decider="rules",
    )


def command(run: str, t: int, step: str, operation: str = "execute") -> ToolCommand:
    return ToolCommand(
        event_id=f"{run}-cmd-{step}-{t}",
        run_id=run,
        occurred_at=at(t),
        command_id=f"{run}-cmd-{step}",
        decision_id=f"{run}-dec-{t - 1}",
        tool=step,
        step=step,
        operation=operation,
        arguments={"domain": "acme-robotics.io"},
        deadline_at=at(t + 60),
    )


def result(run: str, t: int, step: str, ok: bool = True, operation: str = "execute") -> ToolResult:
    return ToolResult(
        event_id=f"{run}-res-{step}-{t}",
        run_id=run,
        occurred_at=at(t),
        command_id=f"{run}-cmd-{step}",
        tool=step,
        step=step,
        operation=operation,
        status=ToolStatus.succeeded if ok else ToolStatus.failed,
        output={"id": f"{step}-1"} if ok else {},
        error=None if ok else "HTTP 503",
        error_kind=None if ok else "transient",
        attempts=1 if ok else 3,
        duration_ms=40,
    )


def completed_run(run: str) -> list[Event]:
    """A run that succeeds. enrich's result is published twice (a redelivered command) and crm fails once
    before succeeding: two distinct steps succeeded, out of four results."""
    return [
        requested(run, 0),
        decided(run, 1, DecisionAction.dispatch, "enrich"),
        command(run, 2, "enrich"),
        result(run, 3, "enrich"),
        result(run, 4, "enrich"),
        decided(run, 5, DecisionAction.dispatch, "crm"),
        command(run, 6, "crm"),
        result(run, 7, "crm", ok=False),
        result(run, 8, "crm"),
        RunCompleted(
            event_id=f"{run}-done", run_id=run, occurred_at=at(9), decision_id=f"{run}-dec-9", reason="all steps done"
        ),
    ]


def failed_run(run: str, status: FailureStatus = FailureStatus.failed) -> list[Event]:
    """A run whose crm step fails for good; crm is then compensated, a succeeded result that is not an
    executed step and must not count."""
    return [
        requested(run, 0),
        decided(run, 1, DecisionAction.dispatch, "enrich"),
        command(run, 2, "enrich"),
        result(run, 3, "enrich"),
        decided(run, 4, DecisionAction.dispatch, "crm"),
        command(run, 5, "crm"),
        result(run, 6, "crm", ok=False),
        decided(run, 7, DecisionAction.compensate, "crm"),
        command(run, 8, "crm", operation="compensate"),
        result(run, 9, "crm", operation="compensate"),
        RunFailed(
            event_id=f"{run}-failed",
            run_id=run,
            occurred_at=at(10),
            decision_id=f"{run}-dec-10",
            status=status,
            reason="crm failed: HTTP 503",
            failed_step="crm",
        ),
    ]


def snapshot(run: str) -> StateSnapshot:
    """A state snapshot: decodable, but not a run event (it lives on the state topic)."""
    request = OnboardingRequest(
        company_name="Acme",
        company_domain="acme-robotics.io",
        contact_name="Ada",
        contact_email="ada@acme-robotics.io",
        goal="onboard new client",
        requested_by="crm-webhook",
    )
    return StateSnapshot(
        run_id=run,
        version=1,
        status=RunStatus.running,
        request=request,
        steps=[],
        created_at=T0,
        updated_at=T0,
        deadline_at=at(600),
        last_event_id=f"{run}-req",
    )


def _topic_of(settings: Settings, model: BaseModel) -> str:
    if isinstance(model, ToolCommand):
        return settings.topic(command_topic(model.tool))
    if isinstance(model, ToolResult):
        return settings.topic(TOOL_RESULTS)
    if isinstance(model, StateSnapshot):
        return settings.topic(RUN_STATE)
    return settings.topic(RUN_EVENTS)


def consumed(settings: Settings, models: list[BaseModel]) -> list[Incoming]:
    """Produce ``models`` to their topics and consume them back: batch items as the runtime builds them,
    in the order of ``models``."""
    create_topics(settings, all_topics(TOOLS))
    producer = make_producer(settings)
    for model in models:
        producer.produce(_topic_of(settings, model), key=model.run_id.encode(), value=codec.encode(model))
    assert producer.flush(10) == 0
    by_bytes: dict[bytes, Incoming] = {}
    for topic in sorted({_topic_of(settings, m) for m in models}):
        for msg in read_topic(settings, topic):
            by_bytes[msg.value()] = Incoming(msg, codec.decode(msg.value()))
    return [by_bytes[codec.encode(m)] for m in models]


@pytest.fixture
def dlq_producer(settings: Settings) -> Iterator[Producer]:
    """The producer of the batches' dead-letter sink, a real one: rejected items go to the real topic."""
    producer = make_producer(settings)
    yield producer
    producer.flush(10)


@pytest.fixture
def handler(settings: Settings) -> Iterator[ProjectionHandler]:
    db.migrate(settings, SCHEMA)
    handler = ProjectionHandler(settings)
    yield handler
    handler.db.close()


def batch_of(settings: Settings, producer: Producer, items: list[Incoming]) -> Batch:
    return Batch(list(items), DeadLetterSink(settings, producer, "projection"))


def runs_table(settings: Settings) -> list[tuple[Any, ...]]:
    with db.connect(settings) as conn:
        return conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall()


def events_table(settings: Settings, with_recorded_at: bool = True) -> list[tuple[Any, ...]]:
    """Every stored timeline row; ``recorded_at`` is when the row was first written, so it is left out
    when comparing two projections made at different times."""
    recorded = ", recorded_at" if with_recorded_at else ""
    with db.connect(settings) as conn:
        return conn.execute(
            "SELECT event_id, run_id, type, occurred_at, causation_id, step, summary, payload, topic,"
            f" kafka_partition, kafka_offset{recorded} FROM run_events ORDER BY event_id"
        ).fetchall()


def test_a_run_projects_into_one_row_and_one_timeline_entry_per_event(
    settings: Settings, handler: ProjectionHandler, dlq_producer: Producer
) -> None:
    events = completed_run("run-a")
    items = consumed(settings, events)
    handler(batch_of(settings, dlq_producer, items))

    row = queries.run(settings, "run-a")
    assert row is not None
    assert (row.status, row.company_name, row.workflow) == ("completed", "Acme run-a", "onboarding")
    assert row.failed_step is None
    # enrich counted once despite its two results, crm once despite its failed attempt.
    assert row.steps_done == 2
    assert (row.created_at, row.ended_at, row.reason) == (at(0), at(9), "all steps done")
    assert row.duration_s == 9.0
    with db.connect(settings) as conn:
        extra = conn.execute(
            "SELECT company_domain, contact_email, requested_by, updated_at FROM runs WHERE run_id='run-a'"
        ).fetchone()
    assert extra == ("acme-robotics.io", "ada@acme-robotics.io", "crm-webhook", at(9))
    assert [r.run_id for r in queries.runs(settings)] == ["run-a"]

    stored = {r[0]: r for r in events_table(settings)}
    assert len(stored) == len(events)
    for event, item in zip(events, items, strict=True):
        step, summary = summarize(event)
        msg = item.message
        assert stored[event.event_id][1:11] == (
            "run-a",
            event.type,
            event.occurred_at,
            event.causation_id,
            step,
            summary,
            event.model_dump(mode="json"),
            msg.topic(),
            msg.partition(),
            msg.offset(),
        )
    # The read side's timeline gives the run's story in order, with the handler's summaries.
    timeline = queries.timeline(settings, "run-a")
    assert [e.event_id for e in timeline] == [e.event_id for e in events]
    assert timeline[7].summary == "crm failed after 3 attempt(s), 40 ms: transient: HTTP 503"
    assert timeline[1].summary == "decided dispatch enrich on state v1 [rules]: dispatch enrich"


def test_the_same_batch_delivered_twice_changes_nothing(
    settings: Settings, handler: ProjectionHandler, dlq_producer: Producer
) -> None:
    items = consumed(settings, [*completed_run("run-a"), *failed_run("run-b")])
    handler(batch_of(settings, dlq_producer, items))
    runs_before, events_before = runs_table(settings), events_table(settings)
    assert len(runs_before) == 2 and len(events_before) == len(items)

    # Redelivered after a lost commit, to this handler and to a new process's (a restart).
    handler(batch_of(settings, dlq_producer, items))
    again = ProjectionHandler(settings)
    try:
        again(batch_of(settings, dlq_producer, items))
        # And a redelivery that overlaps the previous batch only in part.
        again(batch_of(settings, dlq_producer, items[5:12]))
    finally:
        again.db.close()
    assert runs_table(settings) == runs_before  # every column, updated_at and steps_done included
    assert events_table(settings) == events_before  # the first recording (recorded_at) is kept


def _orders(items: list[Incoming]) -> Iterator[tuple[str, list[list[Incoming]]]]:
    """The same events cut into batches in other orders, as topics consumed at different speeds give."""
    yield "reversed, one per batch", [[i] for i in reversed(items)]
    results_first = sorted(items, key=lambda i: not isinstance(i.event, ToolResult))
    yield "results before requests", [results_first[n : n + 3] for n in range(0, len(results_first), 3)]
    shuffled = list(items)
    random.Random(7).shuffle(shuffled)
    yield "shuffled, two per batch", [shuffled[n : n + 2] for n in range(0, len(shuffled), 2)]
    terminal_first = sorted(items, key=lambda i: not isinstance(i.event, RunCompleted | RunFailed))
    yield "terminal event first", [terminal_first[:2], terminal_first[2:]]


def test_events_of_a_run_in_any_order_end_in_the_same_row(
    settings: Settings, handler: ProjectionHandler, dlq_producer: Producer
) -> None:
    items = consumed(settings, [*completed_run("run-a"), *failed_run("run-b")])
    handler(batch_of(settings, dlq_producer, items))
    expected_runs, expected_events = runs_table(settings), events_table(settings, with_recorded_at=False)
    assert [r[5] for r in expected_runs] == ["completed", "failed"]  # status, so the reference is a real one

    for name, batches in _orders(items):
        with db.connect(settings) as conn:
            conn.execute("TRUNCATE runs, run_events")
        for items_of_batch in batches:
            handler(batch_of(settings, dlq_producer, items_of_batch))
        assert runs_table(settings) == expected_runs, name
        assert events_table(settings, with_recorded_at=False) == expected_events, name


@pytest.mark.parametrize("status", [FailureStatus.failed, FailureStatus.escalated])
def test_a_failed_run_records_its_status_step_and_reason(
    settings: Settings, handler: ProjectionHandler, dlq_producer: Producer, status: FailureStatus
) -> None:
    handler(batch_of(settings, dlq_producer, consumed(settings, failed_run("run-b", status))))
    row = queries.run(settings, "run-b")
    assert row is not None
    assert (row.status, row.failed_step, row.reason) == (status.value, "crm", "crm failed: HTTP 503")
    assert row.ended_at == at(10)
    # enrich only: crm's execution failed and its compensation is not an executed step.
    assert row.steps_done == 1
    assert queries.status_counts(settings, ["run-b"]) == {status.value: 1}
    assert queries.timeline(settings, "run-b")[-1].summary == f"{status.value}: crm failed: HTTP 503"


def test_a_wait_shows_what_the_run_waits_for_until_a_dispatch(
    settings: Settings, handler: ProjectionHandler, dlq_producer: Producer
) -> None:
    run = "run-w"
    waiting = decided(run, 1, DecisionAction.wait, None, reason="waiting for tool crm")
    dispatched = decided(run, 2, DecisionAction.dispatch, "crm")
    waiting_again = decided(run, 3, DecisionAction.wait, None, reason="waiting for tool enrich")
    done = RunCompleted(event_id=f"{run}-done", run_id=run, occurred_at=at(5), decision_id="d5", reason="done")
    late_wait = decided(run, 6, DecisionAction.wait, None, reason="waiting for tool slack")
    items = consumed(settings, [requested(run), waiting, dispatched, waiting_again, done, late_wait])

    def reason() -> str | None:
        row = queries.run(settings, run)
        assert row is not None
        return row.reason

    handler(batch_of(settings, dlq_producer, items[:2]))
    assert reason() == "waiting for tool crm"
    assert queries.run(settings, run).status == "running"  # type: ignore[union-attr]
    handler(batch_of(settings, dlq_producer, items[2:3]))
    assert reason() is None
    # Within one batch the latest of the run's waits and dispatches wins.
    handler(batch_of(settings, dlq_producer, items[1:4]))
    assert reason() == "waiting for tool enrich"
    handler(batch_of(settings, dlq_producer, items[1:3]))
    assert reason() is None
    # An ended run keeps its ending's reason, whatever wait arrives after it (in a later batch, or in
    # the same one).
    handler(batch_of(settings, dlq_producer, items[4:5]))
    assert reason() == "done"
    handler(batch_of(settings, dlq_producer, items[5:6]))
    assert reason() == "done"
    handler(batch_of(settings, dlq_producer, items[4:6]))
    assert reason() == "done"


def test_an_item_that_is_not_a_run_event_is_rejected_and_the_rest_projected(
    settings: Settings, handler: ProjectionHandler, dlq_producer: Producer
) -> None:
    models: list[BaseModel] = [requested("run-s"), snapshot("run-s"), result("run-s", 3, "enrich")]
    items = consumed(settings, models)
    batch = batch_of(settings, dlq_producer, items)
    handler(batch)
    assert dlq_producer.flush(10) == 0  # the runtime flushes before committing; so does the test

    assert len(batch) == 2 and [i.event for i in batch] == [models[0], models[2]]
    [letter] = read_dead_letters(settings)
    msg = items[1].message
    assert (letter.reason, letter.error, letter.processor) == (
        "unexpected-event",
        "StateSnapshot is not a run event",
        "projection",
    )
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        settings.topic(RUN_STATE),
        msg.partition(),
        msg.offset(),
    )
    assert letter.value == msg.value() and letter.key == b"run-s"  # byte for byte, for `dlq replay`
    assert {r[0] for r in events_table(settings)} == {"run-s-req", "run-s-res-enrich-3"}
    row = queries.run(settings, "run-s")
    assert row is not None and (row.status, row.steps_done) == ("running", 1)
