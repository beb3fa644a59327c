"""The state processor's timer costs what is due, not what exists; admission keeps runs in order."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from streamagent.processors.state.app import StateWorker
from streamagent.processors.state.fold import RunState, apply
from streamagent.processors.state.store import MemoryStore
from streamagent.processors.state.watch import DEADLINE, Admission, DueQueue
from test_fold import DEFAULT_DEADLINE_S, T0, full_run, requested

from streamagent import codec
from streamagent.config import Settings
from streamagent.events import (
    Event,
    FailureStatus,
    RunCancelRequested,
    RunDeadlineExceeded,
    RunFailed,
    RunRequested,
    ToolResult,
    cancel_event_id,
    child_run_id,
    command_id,
    ended_by_parent_id,
    requested_event_id,
)


class RecordingProducer:
    """Stands in for the Kafka producer in a broker-free unit test: keeps what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, key: bytes, value: bytes, **_: Any) -> None:
        self.sent.append((topic, key, value))

    def flush(self, _timeout: float = 0) -> int:
        return 0


@dataclass
class Message:
    topic: str
    value: bytes
    partition: int = 0
    offset: int = 0
    key: bytes = b"run-1"


def fold(worker: StateWorker, *events: Event) -> None:
    """One batch of ``events`` through the worker, each on its topic (a one-partition stack)."""
    topic = {True: worker.results_topic, False: worker.events_topic}
    worker.fold_batch(
        [Message(topic[isinstance(e, ToolResult)], codec.encode(e), key=e.run_id.encode()) for e in events]
    )


def child_request(parent: str, workflow: str = "kyc-check", step: str = "kyc") -> RunRequested:
    """The request the decision processor writes for ``parent``'s child step (workflows/onboarding-kyc.toml)."""
    cid = command_id(parent, step)
    child = child_run_id(parent, step, cid)
    base = requested(event_id=requested_event_id(child), run_id=child)
    update = {"workflow": workflow, "parent_run_id": parent, "parent_step": step, "parent_command_id": cid}
    return base.model_copy(update=update)


def parent_request(run_id: str) -> RunRequested:
    return requested(event_id=f"req-{run_id}", run_id=run_id).model_copy(update={"workflow": "onboarding-kyc"})


def _finished() -> bytes:
    state: RunState | None = None
    for event in full_run():
        state = apply(state, event, DEFAULT_DEADLINE_S).state
    assert state is not None
    return state.model_dump_json().encode()


def _running(run_id: str) -> RunState:
    return apply(None, requested(event_id=f"req-{run_id}", run_id=run_id), DEFAULT_DEADLINE_S).state


def _worker(finished: int, running: int) -> tuple[StateWorker, MemoryStore, RecordingProducer]:
    store = MemoryStore()
    done = _finished()
    for i in range(finished):
        store.data[f"done-{i}"] = done
    for i in range(running):
        store.put(_running(f"live-{i}"), 0)
    producer = RecordingProducer()
    settings = Settings(partitions=4, max_running_runs=0)
    worker = StateWorker(settings, store, producer)  # type: ignore[arg-type]
    worker.sync_assignment(frozenset(range(4)))  # the one scan, at assignment
    return worker, store, producer


@pytest.mark.parametrize("finished", [10, 100_000])
def test_a_tick_touches_only_what_is_due_however_many_runs_finished(finished: int) -> None:
    worker, store, producer = _worker(finished, running=5)
    producer.sent.clear()
    store.reads = 0
    deadline = (T0 + timedelta(seconds=45)).timestamp()  # requested() gives each run a 45 s deadline

    asyncio.run(worker.tick(now=deadline - 1))
    assert (worker.queue.touched, store.reads, producer.sent) == (0, 0, [])

    asyncio.run(worker.tick(now=deadline + 1))
    assert worker.queue.touched == 5  # the five running runs' deadlines, nothing else
    events = [codec.decode(value) for _, _, value in producer.sent]
    assert sorted(e.run_id for e in events if isinstance(e, RunDeadlineExceeded)) == [f"live-{i}" for i in range(5)]


def test_recovery_skips_finished_runs_without_parsing_them() -> None:
    worker, _, producer = _worker(finished=1000, running=3)
    # Deadlines of the three live runs, and the retention of each finished one (scheduled unparsed).
    assert len(worker.cache) == 3 and len(worker.queue) == 3 + 1000
    # Runs waiting for a decision get their snapshot again after a rebalance (a crash may have lost it).
    assert len(producer.sent) == 3


def test_due_queue_replaces_and_cancels_without_scanning() -> None:
    queue = DueQueue()
    queue.schedule(0, "a", DEADLINE, 10.0)
    queue.schedule(0, "a", DEADLINE, 20.0)  # rescheduled: the first entry is stale
    queue.schedule(1, "b", DEADLINE, 5.0)
    queue.cancel("b", DEADLINE)
    assert queue.due(15.0) == []
    assert queue.due(25.0) == [(0, "a", DEADLINE)]
    assert len(queue) == 0 and queue.touched == 3


def test_due_queue_compacts_when_stale_entries_pile_up() -> None:
    queue = DueQueue()
    for at in range(1000):
        queue.schedule(0, "a", DEADLINE, float(at))
    assert len(queue._heaps[0]) < 100  # rescheduling one run a thousand times keeps the heap small
    assert queue.due(2000.0) == [(0, "a", DEADLINE)]


def test_admission_bounds_runs_per_partition_and_admits_in_arrival_order() -> None:
    admission = Admission.for_stack(max_running_runs=4, partitions=2)  # 2 per partition
    for run in ("r1", "r2"):
        assert admission.has_room(0)
        admission.admit(0, run)
    assert not admission.has_room(0) and admission.has_room(1)
    for run in ("r3", "r4", "r5"):
        admission.wait(0, run)
    assert admission.next_waiting(0) is None  # full
    admission.finish(0, "r1")
    assert admission.next_waiting(0) == "r3"
    admission.admit(0, "r3")
    admission.finish(0, "r2")
    admission.withdraw(0, "r5")  # ended while waiting (deadline), so never admitted in turn
    assert [admission.next_waiting(0), admission.next_waiting(0)] == ["r4", None]
    assert (admission.running, admission.queued) == (1, 0)


def test_a_run_that_ends_mid_batch_keeps_every_event_of_the_batch() -> None:
    """The deciding "complete" and the RunCompleted after it, in one batch: both are folded (the run
    leaves the cache when it ends, before the batch reaches the store)."""
    store, producer = MemoryStore(), RecordingProducer()
    worker = StateWorker(Settings(partitions=4, max_running_runs=0), store, producer)  # type: ignore[arg-type]
    events = full_run()
    batches = [events[:-2], events[-2:]]  # the last batch: the "complete" decision and RunCompleted
    for batch in batches:
        topic = {True: worker.results_topic, False: worker.events_topic}
        worker.fold_batch([Message(topic[e.type == "ToolResult"], codec.encode(e)) for e in batch])
    state = store.get(events[0].run_id)
    assert state is not None
    assert state.applied == [e.event_id for e in events]
    assert state.snapshot.version == len(events)


def test_an_ended_run_leaves_the_table_after_its_retention() -> None:
    worker, store, _ = _worker(finished=5, running=2)
    retention = worker.settings.state_retention_s
    asyncio.run(worker.tick(now=time.time() + retention - 60))
    assert len(store.data) == 7  # not yet
    asyncio.run(worker.tick(now=time.time() + retention + 1))
    # The finished ones are gone; the live runs stay whatever their age.
    assert sorted(store.data) == ["live-0", "live-1"]


def test_an_ended_run_parsed_at_assignment_leaves_the_table_after_its_retention_too() -> None:
    # A cancelled run (and an abandoned one) is parsed at assignment, in case it has undos to send; one
    # with none is as finished as a completed run and must leave the table the same way.
    store = MemoryStore()
    store.data["cancelled-0"] = _finished().replace(b'"status":"completed"', b'"status":"cancelled"', 1)
    worker = StateWorker(Settings(partitions=4, max_running_runs=0), store, RecordingProducer())  # type: ignore[arg-type]
    worker.sync_assignment(frozenset(range(4)))
    assert worker.cache == {}
    asyncio.run(worker.tick(now=time.time() + worker.settings.state_retention_s + 1))
    assert store.data == {}


def test_release_forgets_every_partition_memory() -> None:
    worker, _, _ = _worker(finished=3, running=3)
    worker.positions[("events", 0)] = 7
    worker.release()
    assert (worker.assigned, worker.cache, len(worker.queue), worker.positions) == (None, {}, 0, {})
    assert (worker.admission.running, worker.admission.queued) == (0, 0)
    # The live runs' partitions went to another member: nothing of theirs is rebuilt here.
    theirs = {worker.partition(f"live-{i}") for i in range(3)}
    worker.sync_assignment(frozenset(set(range(4)) - theirs))
    assert worker.cache == {} and worker.admission.running == 0 and worker.queue.scheduled("live-0", DEADLINE) is None


def test_a_child_run_is_admitted_at_once_outside_the_bound() -> None:
    """Its parent's place covers it: with every place held by parents, a child still starts at once (it
    waited behind them before, and the stack stalled until deadlines ended them), and its end frees no place."""
    store, producer = MemoryStore(), RecordingProducer()
    worker = StateWorker(Settings(partitions=1, max_running_runs=1), store, producer)  # type: ignore[arg-type]
    worker.sync_assignment(frozenset({0}))
    fold(worker, parent_request("p1"), parent_request("p2"))
    assert (worker.admission.running, worker.admission.queued) == (1, 1)  # p2 waits for p1's place
    kid = child_request("p1")
    fold(worker, kid)
    state = store.get(kid.run_id)
    assert state is not None and state.admitted
    assert [key for topic, key, _ in producer.sent if topic == worker.snapshots_topic][-1] == kid.run_id.encode()
    assert (worker.admission.running, worker.admission.queued) == (1, 1)  # not counted: p2 still waits
    # Rebuilt from the table (a rebalance), the bound still counts the parents only.
    worker.release()
    worker.sync_assignment(frozenset({0}))
    assert kid.run_id in worker.cache and (worker.admission.running, worker.admission.queued) == (1, 1)
    ended = RunFailed(
        event_id=ended_by_parent_id(kid.run_id),
        run_id=kid.run_id,
        decision_id="d",
        status=FailureStatus.failed,
        reason="test",
    )
    fold(worker, ended)
    assert (worker.admission.running, worker.admission.queued) == (1, 1)  # nor does its end free p1's place


def test_a_run_cancelled_while_it_waits_for_a_place_is_ended_out_of_turn() -> None:
    store, producer = MemoryStore(), RecordingProducer()
    worker = StateWorker(Settings(partitions=1, max_running_runs=1), store, producer)  # type: ignore[arg-type]
    worker.sync_assignment(frozenset({0}))
    fold(worker, requested(event_id="req-p1", run_id="p1"), requested(event_id="req-p2", run_id="p2"))
    assert (worker.admission.running, worker.admission.queued) == (1, 1)
    fold(worker, RunCancelRequested(event_id=cancel_event_id("p2"), run_id="p2", by="grace"))
    state = store.get("p2")
    assert state is not None and state.admitted and state.snapshot.cancelled == "cancelled by grace"
    assert [key for topic, key, _ in producer.sent if topic == worker.snapshots_topic][-1] == b"p2"
    assert worker.admission.queued == 0
