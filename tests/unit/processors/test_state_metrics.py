"""What the state processor measures while it folds: step and run latency, event age, the root span of
a run's trace, and (every interval) its consumer lag and the age of its oldest run in flight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import REGISTRY
from streamagent.processors.state.app import PROCESSOR, StateWorker
from streamagent.processors.state.store import MemoryStore
from test_fold import RUN, full_run, requested
from test_state_timer import RecordingProducer

from streamagent import codec, tracing
from streamagent.config import Settings
from streamagent.events import DecisionRecorded, Event, ToolResult
from streamagent.topics import DEAD_LETTERS


@dataclass
class Message:  # what faust hands the fold
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _worker() -> StateWorker:
    worker = StateWorker(Settings(partitions=4, max_running_runs=0), MemoryStore(), RecordingProducer())  # type: ignore[arg-type]
    worker.sync_assignment(frozenset(range(4)))
    return worker


def _messages(worker: StateWorker, events: list[Event]) -> list[Any]:
    out = []
    for offset, event in enumerate(events):
        topic = worker.results_topic if isinstance(event, ToolResult) else worker.events_topic
        out.append(Message(topic, worker.partition(event.run_id), offset, event.run_id.encode(), codec.encode(event)))
    return out


def test_a_folded_run_observes_each_step_the_run_and_every_events_age() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    worker = _worker()
    # Without the trailing RunCompleted: the complete decision ends the run already, and a later event of
    # an ended run in the same batch is refused as unknown-run (the fold's business, not this test's).
    events = full_run()[:-1]
    results = [e for e in events if isinstance(e, ToolResult)]
    dispatched = {e.command_id: e.occurred_at for e in events if isinstance(e, DecisionRecorded) and e.command_id}
    steps = {r.step: _sample("streamagent_step_seconds_count", step=r.step, status="succeeded") for r in results}
    step_sums = {r.step: _sample("streamagent_step_seconds_sum", step=r.step, status="succeeded") for r in results}
    runs = _sample("streamagent_run_seconds_count", status="completed")
    hops = _sample("streamagent_hop_seconds_count", processor=PROCESSOR, topic=worker.results_topic)
    exporter = InMemorySpanExporter()
    tracing.configure(Settings(), "state", exporter=exporter)
    try:
        worker.fold_batch(_messages(worker, events))
    finally:
        tracing.shutdown()

    for r in results:  # from the decision that dispatched the command to its result
        took = (r.occurred_at - dispatched[r.command_id]).total_seconds()
        assert took > 0
        assert _sample("streamagent_step_seconds_count", step=r.step, status="succeeded") == steps[r.step] + 1
        assert _sample("streamagent_step_seconds_sum", step=r.step, status="succeeded") == step_sums[r.step] + took
    assert _sample("streamagent_run_seconds_count", status="completed") == runs + 1
    assert _sample("streamagent_hop_seconds_count", processor=PROCESSOR, topic=worker.results_topic) == hops + len(
        results
    )
    (root,) = exporter.get_finished_spans()
    assert (root.name, root.attributes["streamagent.run.status"]) == ("run", "completed")
    assert root.context.span_id == tracing.run_span_id(RUN)
    assert root.context.trace_id == tracing.run_trace_id(RUN)

    # Folded again (a redelivery): the run is over already, nothing is observed twice.
    worker.fold_batch(_messages(worker, events))
    assert _sample("streamagent_run_seconds_count", status="completed") == runs + 1


def test_report_sets_lag_from_high_watermarks_and_the_oldest_run_age() -> None:
    worker = _worker()
    run = requested(run_id="run-oldest")
    worker.fold_batch(_messages(worker, [run]))
    partition = worker.partition("run-oldest")
    assert worker.report_due(1000.0) and not worker.report_due(1001.0)  # every consumer_lag_interval_s
    now = run.occurred_at.timestamp() + 42
    worker.report({(worker.events_topic, partition): 6, ("some-changelog", 0): 9}, now)
    group = worker.settings.group(PROCESSOR)
    assert _sample("streamagent_consumer_lag", group=group, topic=worker.events_topic, partition=str(partition)) == 5
    assert (
        REGISTRY.get_sample_value(
            "streamagent_consumer_lag", {"group": group, "topic": "some-changelog", "partition": "0"}
        )
        is None
    )
    assert _sample("streamagent_run_oldest_age_seconds") == 42
    worker.report({}, now)  # the partition was given away: no longer reported by this worker
    assert (
        REGISTRY.get_sample_value(
            "streamagent_consumer_lag", {"group": group, "topic": worker.events_topic, "partition": str(partition)}
        )
        is None
    )


def test_a_run_ending_mid_batch_is_counted_once() -> None:
    """The complete decision and RunCompleted in one batch: the second folds onto the first's result,
    not onto the state stored before the batch (which counted the run's end, and its span, twice)."""
    worker = _worker()
    messages = _messages(worker, full_run())
    completed = _sample("streamagent_runs_total", status="completed")
    worker.fold_batch(messages[:-2])
    worker.fold_batch(messages[-2:])
    assert _sample("streamagent_runs_total", status="completed") == completed + 1
    stored = worker.store.get(RUN)
    assert stored is not None and stored.snapshot.status.value == "completed"
    assert stored.snapshot.version == len(messages)  # every event folded once, in order


def test_a_record_read_back_from_the_broker_that_cannot_be_decoded_is_dead_lettered_under_its_key() -> None:
    from streamagent.processors.state.offsets import Record

    worker = _worker()
    producer = worker.producer
    poison = Record(worker.events_topic, 0, 7, b"run-poison", b"not an avro event", [("h", b"v")], 0.0)
    worker.fold_batch([poison])  # a record the fold filled from the broker, as faust's hole reads do
    letters = [(key, value) for topic, key, value in producer.sent if topic == worker.settings.topic(DEAD_LETTERS)]
    assert letters and letters[0][0] == b"run-poison"
