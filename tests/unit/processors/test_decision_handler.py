"""The decision handler on the real PostgreSQL: one round trip per batch, commands before decisions,
and a redelivered batch answered from the record without deciding again."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from streamagent.processors.decision.processor import DecisionHandler
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.state.fold import apply
from test_fold import DEFAULT_DEADLINE_S, requested

from streamagent import codec, db
from streamagent.authn import tool_keys
from streamagent.config import Settings
from streamagent.events import DecisionRecorded, ToolCommand
from streamagent.runtime import Batch, Incoming
from streamagent.signing import load_keys, verify
from streamagent.topics import RUN_EVENTS


class LandingProducer:
    """Stands in for the Kafka producer in this test: numbers what it is given, per topic."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self._pending: list[Any] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any = None, **_: Any) -> None:
        offset = sum(1 for t, _ in self.sent if t == topic)
        self.sent.append((topic, value))
        if on_delivery is not None:
            self._pending.append((on_delivery, _Delivered(topic, offset)))

    def flush(self, _timeout: float = 0) -> int:
        for callback, delivered in self._pending:
            callback(None, delivered)
        self._pending.clear()
        return 0


class _Delivered:
    def __init__(self, topic: str, offset: int) -> None:
        self._topic, self._offset = topic, offset

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def _batch(snapshots: list[Any]) -> Batch:
    items = [Incoming(_Delivered("agent.run.state", i), snap) for i, snap in enumerate(snapshots)]  # type: ignore[arg-type]
    return Batch(items, sink=None)  # type: ignore[arg-type]


def test_a_batch_costs_one_round_trip_and_a_redelivery_none(settings: Settings) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    producer = LandingProducer()
    handler = DecisionHandler(settings, RulesDecider(), producer)  # type: ignore[arg-type]
    snapshots = [
        apply(None, requested(event_id=f"req-{i}", run_id=f"run-{i}"), DEFAULT_DEADLINE_S).state.snapshot
        for i in range(20)
    ]

    handler(_batch(snapshots))
    assert handler.round_trips == 1  # one INSERT for twenty decisions
    topics = [t for t, _ in producer.sent]
    commands = [codec.decode(v) for t, v in producer.sent if t != settings.topic(RUN_EVENTS)]
    decisions = [codec.decode(v) for t, v in producer.sent if t == settings.topic(RUN_EVENTS)]
    assert len(commands) == 20 and all(isinstance(c, ToolCommand) for c in commands)
    keys = load_keys(settings)
    assert all(
        c.signature.startswith(f"v1:{keys.signer.key_id}:") and verify(c, tool_keys(keys, c.tool)) is None
        for c in commands
    )
    # Every command is produced before the first decision, which says where its command landed.
    assert topics.index(settings.topic(RUN_EVENTS)) == 20
    assert all(isinstance(d, DecisionRecorded) and d.command_offset is not None for d in decisions)
    assert sorted(d.command_offset for d in decisions) == list(range(20))

    producer.sent.clear()
    handler(_batch(snapshots))  # redelivered after a lost commit: the recorded bytes, no query, no decider
    assert handler.round_trips == 1
    again = [codec.decode(v) for t, v in producer.sent if t == settings.topic(RUN_EVENTS)]
    assert [d.decision_id for d in again] == [d.decision_id for d in decisions]


def test_a_batch_that_could_not_be_stored_leaves_no_decision_in_memory(settings: Settings) -> None:
    """PostgreSQL went away before the decisions were stored: the retried batch must store them, not
    replay them from memory (their commands would reach tools with no recorded decision)."""
    db.migrate(settings, DECISION_SCHEMA)
    producer = LandingProducer()
    handler = DecisionHandler(settings, RulesDecider(), producer)  # type: ignore[arg-type]
    snapshots = [
        apply(None, requested(event_id=f"req-{i}", run_id=f"run-{i}"), DEFAULT_DEADLINE_S).state.snapshot
        for i in range(3)
    ]
    handler.db.discard()
    handler.db.database_url = "postgresql://nobody@127.0.0.1:1/down"  # the outage
    with pytest.raises(psycopg.OperationalError):
        handler(_batch(snapshots))
    assert producer.sent == [] and handler.memory == {}

    handler.db.database_url = settings.database_url  # back
    handler(_batch(snapshots))
    with db.connect(settings) as conn:
        stored = conn.execute("SELECT count(*) FROM decisions WHERE run_id LIKE 'run-%'").fetchone()
    assert stored == (3,)
    assert len([t for t, _ in producer.sent if t != settings.topic(RUN_EVENTS)]) == 3


def _redrive(snap: Any, command: ToolCommand) -> Any:
    """The snapshot the state processor publishes when it finds ``command`` lost."""
    return snap.model_copy(update={"version": snap.version + 2, "redrive_command_id": command.command_id})


def test_a_redriven_command_is_the_recorded_signed_bytes(settings: Settings) -> None:
    db.migrate(settings, DECISION_SCHEMA)
    producer = LandingProducer()
    handler = DecisionHandler(settings, RulesDecider(), producer)  # type: ignore[arg-type]
    snap = apply(None, requested(event_id="req-r", run_id="run-r"), DEFAULT_DEADLINE_S).state.snapshot
    handler(_batch([snap]))
    ((topic, sent),) = [(t, v) for t, v in producer.sent if t != settings.topic(RUN_EVENTS)]
    command = codec.decode(sent)
    assert isinstance(command, ToolCommand)

    producer.sent.clear()
    handler(_batch([_redrive(snap, command)]))
    assert [(t, v) for t, v in producer.sent if t != settings.topic(RUN_EVENTS)] == [(topic, sent)]


def test_a_command_recorded_unsigned_is_signed_when_it_is_redriven(settings: Settings) -> None:
    """A command recorded before signing existed (or under a retired key) would be refused by its tool
    if re-sent as recorded: the re-drive signs it with the current key, ids unchanged."""
    db.migrate(settings, DECISION_SCHEMA)
    handler = DecisionHandler(settings, RulesDecider(), LandingProducer())  # type: ignore[arg-type]
    snap = apply(None, requested(event_id="req-u", run_id="run-u"), DEFAULT_DEADLINE_S).state.snapshot
    handler(_batch([snap]))
    with db.connect(settings) as conn:
        (stored,) = conn.execute("SELECT follow_up_event FROM decisions WHERE run_id = 'run-u'").fetchone()
        recorded = codec.decode(bytes(stored))
        assert isinstance(recorded, ToolCommand)
        legacy = recorded.model_copy(update={"signature": ""})
        conn.execute("UPDATE decisions SET follow_up_event = %s WHERE run_id = 'run-u'", (codec.encode(legacy),))

    producer = LandingProducer()
    restarted = DecisionHandler(settings, RulesDecider(), producer)  # type: ignore[arg-type]
    restarted(_batch([_redrive(snap, legacy)]))
    (resent,) = [codec.decode(v) for t, v in producer.sent if t != settings.topic(RUN_EVENTS)]
    assert isinstance(resent, ToolCommand)
    assert verify(resent, tool_keys(load_keys(settings), resent.tool)) is None
    assert resent.model_copy(update={"signature": ""}) == legacy
