"""The consumer runtime in a group of two, on the real broker: what a rebalance takes away is dropped.

A member waiting out an outage with a batch in hand keeps polling (to stay in its group), so a second
member joining takes partitions from it mid-batch: their messages must leave the batch (the new owner
handles them), the first member must never commit them, and its ``on_revoke`` hooks must hear of it.
Also the members topic: each runtime announces what it owns.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from helpers import eventually
from test_consumer_runtime import NAME, Recorder, committed, events, produce, running, runtime_for

from streamagent.config import Settings
from streamagent.dlq_ops import read_dead_letters
from streamagent.kafka import create_topics
from streamagent.members import read_members
from streamagent.runtime import Batch
from streamagent.topics import DEAD_LETTERS, MEMBERS, RUN_EVENTS, TopicSpec


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"session_timeout_ms": 2000, "heartbeat_interval_ms": 200, "member_report_s": 0.5}
    )


@pytest.fixture
def source(settings: Settings) -> str:
    create_topics(settings, [TopicSpec(RUN_EVENTS), TopicSpec(DEAD_LETTERS), TopicSpec(MEMBERS, compacted=True)])
    return settings.topic(RUN_EVENTS)


def test_partitions_taken_away_mid_batch_are_dropped_not_committed(settings: Settings, source: str) -> None:
    outage_over = threading.Event()

    def database_down(batch: Batch) -> None:
        if not outage_over.is_set():
            raise psycopg.OperationalError("connection failed: the database system is starting up")

    first = Recorder(fail=database_down)
    a = runtime_for(settings.model_copy(update={"instance_id": "member-a"}), source, first)
    revoked: list[set[tuple[str, int]]] = []
    a.on_revoke.append(revoked.append)
    with running(a):
        eventually(lambda: len(a.owned) == settings.partitions, timeout=30, what="member a owning every partition")
        produced = produce(settings, source, events(0, 40, runs=20))
        eventually(lambda: first.calls >= 3, timeout=30, what="member a's batch in an outage")
        second = Recorder()
        b = runtime_for(settings.model_copy(update={"instance_id": "member-b"}), source, second)
        with running(b):
            eventually(lambda: b.owned, timeout=60, what="member b given partitions")
            taken = {p for _t, p in b.owned}
            assert revoked and {p for _t, p in set().union(*revoked)} >= taken
            outage_over.set()
            eventually(lambda: len(first.handled()) + len(second.handled()) >= 40, timeout=60, what="all handled")
            kept = {p for _t, p in a.owned}
            # Member a handled only what it still owned; the taken partitions were b's alone.
            assert {p for p, _o, _e in first.handled()} <= kept
            assert {p for p, _o, _e in second.handled()} <= taken
            everything = [e for _p, _o, e in first.handled() + second.handled()]
            assert sorted(everything) == sorted(f"ev-{i}" for i in range(40))
            expected = {}
            for p in produced:
                expected[p.partition] = max(expected.get(p.partition, 0), p.offset + 1)
            eventually(lambda: committed(settings, source) == expected, timeout=30, what="every partition committed")
            # Both members announced what they own (streamagent status reads this).
            members = eventually(
                lambda: (
                    (m := read_members(settings))
                    and {s.member for s in m.values() if s.group == NAME and s.partitions} == {"member-a", "member-b"}
                    and m
                ),
                timeout=30,
                what="both members announced",
            )
            owners = {s.member: {p.partition for p in s.partitions} for s in members.values() if s.group == NAME}
            assert owners["member-a"] | owners["member-b"] == set(range(settings.partitions))
            assert not owners["member-a"] & owners["member-b"]
    assert read_dead_letters(settings) == []
    # Leaving is announced too.
    eventually(
        lambda: {s.state for s in read_members(settings).values() if s.group == NAME} == {"left"},
        timeout=30,
        what="both members announced they left",
    )
