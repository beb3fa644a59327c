"""Which offsets the fold has taken, per topic-partition, and the records faust failed to deliver.

The run log has no holes: every offset of ``agent.run.events`` and ``agent.tool.results`` holds a
record (no transactions, no compaction). faust-streaming's consumer nevertheless skips records around
a rebalance: a record fetched before the rebalance and drained after it is dropped by the stream
(its generation is stale) and acknowledged; faust's fetch loop then takes the offsets between its
seek position and that record for a hole in the log (``_add_gap``), drops them when they are fetched
again ("DROPPED MESSAGE ROFF") and counts them as acknowledged, so the group's commit moves past
records nobody folded (faust-streaming issues 221, 312, 606). Seen 2026-12-07 in
``test_state_restarts``: a tool result was committed past and never folded, its step was declared
lost, and the group's commits stuck hundreds of offsets behind what had been folded.

So the fold keeps its own account, and takes a record only in offset order:

- ``folded``: per topic-partition, the next offset to fold. A record below it was folded already (a
  redelivery after a seek): it is dropped. A record above it means faust skipped what lies between:
  that range is read from the broker (``read_range``) and folded first.
- ``settled``: ``folded`` as of the last batch whose effects (changelog, snapshots, events) were
  acknowledged. This, not faust's acknowledgements, is what the group commits
  (``faust_compat.commit_from``): the commit never passes a record that was not folded and settled.

A record that faust skipped at the end of a partition has no later record to reveal it: ``stalled``
names the partitions whose end lies beyond ``folded`` with nothing delivered for a while, and the
processor reads that tail itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from streamagent.config import Settings
from streamagent.kafka import client_config

TP = tuple[str, int]


@dataclass(frozen=True)
class Record:
    """A record read straight from the broker, shaped as the fold reads faust's messages."""

    topic: str
    partition: int
    offset: int
    key: bytes | None  # the dead-letter path names the record by its key, as for faust's messages
    value: bytes
    headers: list[tuple[str, bytes]] | None
    timestamp: float


class FoldOffsets:
    """The fold's own offsets (see the module docstring)."""

    def __init__(self, folded: dict[TP, int]) -> None:
        # Shared with the worker (``StateWorker.positions``): the loss checks read how far the fold got.
        self.folded = folded
        self.settled: dict[TP, int] = {}
        self.seen_at: dict[TP, float] = {}

    def holes(self, messages: Iterable[Any], start_of: Callable[[TP], int | None]) -> dict[TP, tuple[int, int]]:
        """The ranges ``[start, end)`` skipped before these messages: one per partition, at most."""
        expect: dict[TP, int | None] = {}
        found: dict[TP, tuple[int, int]] = {}
        for message in messages:
            tp = (message.topic, message.partition)
            if tp not in expect:
                expect[tp] = self.folded[tp] if tp in self.folded else start_of(tp)
            start = expect[tp]
            if start is not None and message.offset > start and tp not in found:
                found[tp] = (start, message.offset)
            if start is None or message.offset >= start:
                expect[tp] = message.offset + 1
        return found

    def take(self, messages: Sequence[Any], start_of: Callable[[TP], int | None]) -> list[Any]:
        """The messages to fold, in order: each partition's next offsets, none folded before.

        A partition first seen since its assignment starts where the group committed (``start_of``;
        None: never committed, it starts with its first record). Raises ``Skipped`` if a record is
        missing before one of them (``holes`` then ``read_range`` should have filled it)."""
        expect: dict[TP, int | None] = {}
        out = []
        for message in messages:
            tp = (message.topic, message.partition)
            if tp not in expect:
                expect[tp] = self.folded[tp] if tp in self.folded else start_of(tp)
            start = expect[tp]
            if start is not None and message.offset < start:
                continue  # folded already: delivered again after a seek
            if start is not None and message.offset > start:
                raise Skipped(tp, start, message.offset)  # nothing of the batch was taken
            expect[tp] = message.offset + 1
            out.append(message)
        # All or nothing: a batch refused above leaves the account as it was.
        now = time.monotonic()
        for tp, offset in expect.items():
            if offset is not None and offset > self.folded.get(tp, -1):
                self.folded[tp] = offset
                self.seen_at[tp] = now
        return out

    def settle(self, folded: dict[TP, int]) -> None:
        """The effects of everything folded up to ``folded`` (a copy of ``folded`` taken after the batch)
        are acknowledged: those offsets may be committed. Never backwards (a revoke may have cleared
        ``folded`` and a redelivery started it lower)."""
        for tp, offset in folded.items():
            if offset > self.settled.get(tp, -1):
                self.settled[tp] = offset

    def commit_offset(self, tp: TP) -> int | None:
        return self.settled.get(tp)

    def forget(self) -> None:
        """Partitions revoked: where the fold resumes is the group's commit once they are assigned again.
        (``settled`` stays: faust commits only for partitions it owns, and only forward.)"""
        self.folded.clear()
        self.seen_at.clear()

    def stalled(self, ends: dict[TP, int], quiet_s: float) -> dict[TP, tuple[int, int]]:
        """Partitions whose end lies beyond what was folded, with nothing delivered for ``quiet_s``."""
        now = time.monotonic()
        out = {}
        for tp, end in ends.items():
            start = self.folded.get(tp)
            if start is not None and end > start and now - self.seen_at.get(tp, now) >= quiet_s:
                out[tp] = (start, end)
        return out


class Skipped(RuntimeError):
    def __init__(self, tp: TP, start: int, offset: int) -> None:
        super().__init__(f"{tp[0]}[{tp[1]}]: offsets {start}..{offset - 1} were never delivered")
        self.tp, self.start, self.offset = tp, start, offset


def read_range(settings: Settings, ranges: dict[TP, tuple[int, int]], timeout_s: float = 15.0) -> list[Record]:
    """Every record of each ``[start, end)`` range, read with a consumer of no group (nothing committed)."""
    if not ranges:
        return []
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": f"{settings.group('state')}-holes",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()])
        wanted = {tp: end for tp, (_, end) in ranges.items()}
        got: dict[TP, list[Record]] = {tp: [] for tp in ranges}
        deadline = time.monotonic() + timeout_s
        while wanted and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            tp = (msg.topic(), msg.partition())
            if msg.error():
                continue  # end of partition (eof) or a transient error: keep polling until the deadline
            if tp not in wanted or msg.offset() >= wanted[tp]:
                wanted.pop(tp, None)
                continue
            got[tp].append(
                Record(
                    tp[0], tp[1], msg.offset(), msg.key(), msg.value() or b"", msg.headers(), msg.timestamp()[1] / 1000
                )
            )
            if msg.offset() + 1 >= wanted[tp]:
                wanted.pop(tp)
        if wanted:
            missing = ", ".join(f"{t}[{p}] before {end}" for (t, p), end in wanted.items())
            raise TimeoutError(f"could not read the skipped records of {missing} within {timeout_s:.0f}s")
        return [r for records in got.values() for r in records]
    finally:
        consumer.close()
