"""Where the state processor keeps each run's state: faust's table, written through librdkafka.

Faust owns the table's life: its changelog topic, recovery after a restart or rebalance, and the
in-memory store it restores into. The writes go around faust's own changelog producer (aiokafka,
pure Python, a third of the processor's CPU under load): each changed run is put into the store and
its changelog record produced by the same librdkafka producer that sends snapshots, to the
partition of the run's events, once per batch. Recovery reads that changelog as faust always does.

Values are the ``RunState`` as compact JSON bytes (pydantic's serializer), so the store stays small
and a finished run can be recognised without parsing it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

from confluent_kafka import Producer
from streamagent.processors.state.checkpoint import digest
from streamagent.processors.state.fold import RunState


class RunStore(Protocol):
    def get(self, run_id: str) -> RunState | None: ...

    def put(self, state: RunState, partition: int) -> None: ...

    def raw_items(self) -> Iterator[tuple[str, bytes]]: ...

    def delete(self, run_id: str, partition: int) -> None: ...


class FaustTableStore:
    """A faust table (value serializer ``raw``) whose changelog this process writes itself."""

    def __init__(self, table: Any, producer: Producer, changelog_topic: str) -> None:
        self.table = table
        self.producer = producer
        self.changelog_topic = changelog_topic
        # Per partition, the highest changelog offset acknowledged (delivery reports) and its record's
        # digest: what a checkpoint covers, and the record it ends on.
        self.written: dict[int, tuple[int, str]] = {}

    def get(self, run_id: str) -> RunState | None:
        value = self.table.data.get(run_id)
        return RunState.model_validate_json(value) if value is not None else None

    def put(self, state: RunState, partition: int) -> None:
        run_id = state.snapshot.run_id
        value = state.model_dump_json().encode()
        self.table.data[run_id] = value
        # Keys as faust's json key serializer writes them, so its recovery restores them as str.
        key = json.dumps(run_id).encode()
        self.producer.produce(self.changelog_topic, key=key, value=value, partition=partition, on_delivery=self._acked)

    def delete(self, run_id: str, partition: int) -> None:
        """A run past its retention leaves the table: a tombstone in the changelog (compaction drops it
        on Kafka; recovery deletes it)."""
        self.table.data.pop(run_id, None)
        key = json.dumps(run_id).encode()
        self.producer.produce(self.changelog_topic, key=key, value=None, partition=partition, on_delivery=self._acked)

    def _acked(self, err: Any, msg: Any) -> None:
        if err is None:
            p = msg.partition()
            if msg.offset() > self.written.get(p, (-1, ""))[0]:
                self.written[p] = (msg.offset(), digest(msg.key(), msg.value()))

    def raw_items(self) -> Iterator[tuple[str, bytes]]:
        return iter(list(self.table.data.items()))


class MemoryStore:
    """A plain dict store (unit tests and tools that fold without Kafka)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.reads = 0

    def get(self, run_id: str) -> RunState | None:
        self.reads += 1
        value = self.data.get(run_id)
        return RunState.model_validate_json(value) if value is not None else None

    def put(self, state: RunState, partition: int) -> None:
        self.data[state.snapshot.run_id] = state.model_dump_json().encode()

    def raw_items(self) -> Iterator[tuple[str, bytes]]:
        return iter(list(self.data.items()))

    def delete(self, run_id: str, partition: int) -> None:
        self.data.pop(run_id, None)


_ACTIVE_MARKS = (b'"status":"running"', b'"status":"dispatched"', b'"status":"compensating"')


def maybe_active(value: bytes) -> bool:
    """A cheap look at a stored run: could it still need anything? (False positives are parsed.)"""
    if any(mark in value for mark in _ACTIVE_MARKS):
        return True
    # An abandoned run past its deadline, or one an operator cancelled, may still have undos to send.
    abandoned = b'"status":"escalated"' in value and b'"deadline_exceeded":true' in value
    return abandoned or b'"status":"cancelled"' in value
