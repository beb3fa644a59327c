"""Waits survive the handler: a new instance on the same database finds, for the partitions it owns,
the runs that wait, and wakes them a bounded page per tick once their tool is there.

Real PostgreSQL; the catalogue is a set of tool names and the producer a recorder (no Kafka here).
"""

from __future__ import annotations

from collections import Counter

import psycopg
import pytest
from aiokafka.partitioner import DefaultPartitioner
from streamagent.processors.decision.processor import DecisionHandler
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.state.fold import apply
from streamagent.processors.workflow import ONBOARDING
from test_decision_handler import LandingProducer
from test_fold import DEFAULT_DEADLINE_S, requested

from streamagent import codec, db
from streamagent.config import Settings
from streamagent.events import DecisionAction, DecisionRecorded, StateSnapshot, ToolCommand
from streamagent.runtime import Batch, Incoming
from streamagent.topics import RUN_STATE

PARTITIONS = 4
_partitioner = DefaultPartitioner()


def partition_of(run_id: str) -> int:
    """Where the producers put a run's snapshot: murmur2 of its key, the run id."""
    every = list(range(PARTITIONS))
    return int(_partitioner(run_id.encode(), every, every))


class _Message:
    """The consumed record a snapshot came in, as far as the handler looks at it."""

    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def topic(self) -> str:
        return RUN_STATE

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def batch(snapshots: list[StateSnapshot]) -> Batch:
    items = [Incoming(_Message(partition_of(s.run_id), i), s) for i, s in enumerate(snapshots)]  # type: ignore[arg-type]
    return Batch(items, sink=None)  # type: ignore[arg-type]


def first_snapshot(run_id: str) -> StateSnapshot:
    return apply(None, requested(event_id=f"req-{run_id}", run_id=run_id), DEFAULT_DEADLINE_S).state.snapshot


def handler_for(settings: Settings, present: set[str]) -> tuple[DecisionHandler, LandingProducer]:
    producer = LandingProducer()
    decider = RulesDecider(ONBOARDING, available=lambda tool: tool in present)
    return DecisionHandler(settings, decider, producer), producer  # type: ignore[arg-type]


def dispatched(producer: LandingProducer) -> list[str]:
    """Run ids of the commands the producer was given, in order."""
    return [e.run_id for e in (codec.decode(v) for _, v in producer.sent) if isinstance(e, ToolCommand)]


def decisions(settings: Settings) -> dict[str, list[tuple[int, str]]]:
    with db.connect(settings) as conn:
        rows = conn.execute("SELECT run_id, based_on_version, action FROM decisions ORDER BY 1, 2").fetchall()
    out: dict[str, list[tuple[int, str]]] = {}
    for run_id, version, action in rows:
        out.setdefault(run_id, []).append((int(version), action))
    return out


def waiting_rows(settings: Settings) -> set[str]:
    with db.connect(settings) as conn:
        return {r for (r,) in conn.execute("SELECT run_id FROM decision_waits").fetchall()}


def test_a_new_handler_wakes_the_waits_of_the_partitions_it_owns_and_only_those(settings: Settings) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    present: set[str] = set()
    first, _ = handler_for(settings, present)
    snaps = [first_snapshot(f"run-durable-{i}") for i in range(16)]
    by_partition = Counter(partition_of(s.run_id) for s in snaps)
    assert set(by_partition) == set(range(PARTITIONS)), by_partition  # every partition has waiting runs
    first(batch(snaps))
    assert first.waiting == {"enrich"}
    assert waiting_rows(settings) == {s.run_id for s in snaps}
    del first  # the process is gone: its memory with it

    mine = frozenset({0, 2})
    second, producer = handler_for(settings, present)
    assert second.waiting == set()  # a new instance knows nothing until it is assigned partitions
    second.assign(mine)
    assert second.waiting == {"enrich"}  # rebuilt from the table, for its partitions
    assert second.wake() == 0 and producer.sent == []  # enrich still missing: nobody woken

    present.add("enrich")
    ours = {s.run_id for s in snaps if partition_of(s.run_id) in mine}
    assert second.wake() == len(ours)
    assert sorted(dispatched(producer)) == sorted(ours)
    assert second.waiting == set() and second.wake() == 0  # once
    # The others still wait, in the table, for whoever owns their partitions.
    assert waiting_rows(settings) == {s.run_id for s in snaps} - ours
    recorded = decisions(settings)
    for snap in snaps:
        # One decision per (run, version): the wait on v, the dispatch on v+1 for woken runs only.
        woken = [(snap.version + 1, "dispatch")] if snap.run_id in ours else []
        assert recorded[snap.run_id] == [(snap.version, "wait"), *woken], snap.run_id

    # A rebalance gives it the rest: the index is rebuilt for the new assignment and they are woken.
    producer.sent.clear()
    second.assign(frozenset(range(PARTITIONS)))
    assert second.waiting == {"enrich"}
    assert second.wake() == len(snaps) - len(ours)
    assert sorted(dispatched(producer)) == sorted({s.run_id for s in snaps} - ours)
    assert waiting_rows(settings) == set()
    # A partition given up is forgotten: nothing of it is left to wake.
    second.assign(frozenset())
    assert second.waiting == set()


def test_a_tick_wakes_at_most_wake_batch_runs_and_the_next_ticks_the_rest(settings: Settings) -> None:
    settings = settings.model_copy(update={"wake_batch": 3})
    db.migrate(settings, DECISION_SCHEMA)
    present: set[str] = set()
    first, _ = handler_for(settings, present)
    snaps = [first_snapshot(f"run-paged-{i}") for i in range(8)]
    for snap in snaps:  # one batch each: each wait is filed at its own time, the order they are woken in
        first(batch([snap]))

    handler, producer = handler_for(settings, present)
    handler.assign(frozenset(range(PARTITIONS)))
    present.add("enrich")
    counts = [handler.wake() for _ in range(5)]
    assert counts == [3, 3, 2, 0, 0]
    woken = dispatched(producer)
    assert woken == [s.run_id for s in snaps]  # oldest wait first, each exactly once
    assert all(v == [(1, "wait"), (2, "dispatch")] for v in decisions(settings).values())
    assert waiting_rows(settings) == set()


def test_a_run_decided_again_since_its_wait_is_not_woken(settings: Settings) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    present: set[str] = set()
    handler, producer = handler_for(settings, present)
    state = apply(None, requested(event_id="req-late", run_id="run-late"), DEFAULT_DEADLINE_S).state
    handler(batch([state.snapshot]))
    (wait,) = [codec.decode(v) for _, v in producer.sent]
    assert isinstance(wait, DecisionRecorded) and wait.action is DecisionAction.wait
    assert waiting_rows(settings) == {"run-late"}

    # Its deadline passes while it waits: the state processor publishes the state after the wait,
    # and that snapshot is decided (escalated). The same statement deletes the wait's row.
    after_wait = apply(state, wait, DEFAULT_DEADLINE_S).state.snapshot
    late = after_wait.model_copy(update={"deadline_exceeded": True})
    producer.sent.clear()
    handler(batch([late]))
    (ended,) = [e for e in (codec.decode(v) for _, v in producer.sent) if isinstance(e, DecisionRecorded)]
    assert ended.action is DecisionAction.escalate and ended.based_on_version == late.version
    assert waiting_rows(settings) == set()

    # Neither this instance nor a new one wakes it when enrich turns up.
    present.add("enrich")
    producer.sent.clear()
    assert handler.wake() == 0 and producer.sent == []
    fresh, fresh_producer = handler_for(settings, present)
    fresh.assign(frozenset(range(PARTITIONS)))
    assert fresh.waiting == set() and fresh.wake() == 0 and fresh_producer.sent == []
    assert decisions(settings)["run-late"] == [(1, "wait"), (2, "escalate")]


def test_an_assignment_read_during_an_outage_is_read_again_once_postgres_is_back(settings: Settings) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    present: set[str] = set()
    first, _ = handler_for(settings, present)
    first(batch([first_snapshot("run-outage")]))

    handler, producer = handler_for(settings, present)
    handler.db.database_url = "postgresql://nobody@127.0.0.1:1/down"  # the outage
    with pytest.raises(psycopg.OperationalError):
        handler.assign(frozenset(range(PARTITIONS)))
    assert handler.owned is None and handler.waiting == set()  # nothing half-learnt
    handler.assign(frozenset(range(PARTITIONS)))  # the next poll, within the back-off: not tried
    assert handler.owned is None

    handler.db.database_url = settings.database_url  # back, and the back-off over
    handler._wake_not_before = 0.0
    handler.assign(frozenset(range(PARTITIONS)))
    present.add("enrich")
    assert handler.waiting == {"enrich"} and handler.wake() == 1
    assert dispatched(producer) == ["run-outage"]
