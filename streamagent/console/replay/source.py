"""Reading the log for a replay: every partition of the run topics, from a start to a cut, in fold order.

Read with ``assign()`` and no group at all: nothing is joined, nothing is committed, so a replay is
invisible to the live consumer groups (the ``group.id`` librdkafka insists on is a throwaway one).
Each partition is read up to the end it had when the replay reached it (partition EOF, which comes
from the fetch response's high-water mark: the embedded broker's ListOffsets answer is wrong, see
BROKER-NOTES); that is the replay's *cut*. On a running stack, records produced after the cut are
not replayed, and verification says which runs moved on since.

A run's events and its tool results sit on the same partition number of two topics, and the state
processor sees them interleaved in arrival order. The replay merges them by record timestamp (then
topic, then offset), which is that order up to ties within a millisecond.
"""

from __future__ import annotations

import heapq
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, Message, TopicPartition

from streamagent.config import Settings
from streamagent.kafka import admin
from streamagent.kafka import consumer as make_consumer
from streamagent.topics import COMMANDS_PREFIX, RUN_EVENTS, TOOL_RESULTS

# How far before ``--from`` to start reading on a broker that can find offsets by time: a record's
# timestamp is its producer's clock, and a run's request may be stamped a little before it was sent.
SEEK_SLACK_MS = 60_000


@dataclass
class Read:
    """What was read: the fold's records (events + results) and the projection's (those + commands)."""

    fold: list[Message] = field(default_factory=list)
    commands: list[Message] = field(default_factory=list)
    cut: dict[tuple[str, int], int] = field(default_factory=dict)  # end offset read, per topic-partition
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(self.fold) + len(self.commands)


def run_topics(settings: Settings) -> tuple[list[str], list[str]]:
    """(the fold's topics, the command topics that exist), by their physical names."""
    prefix = settings.topic(COMMANDS_PREFIX)
    names = admin(settings).list_topics(timeout=10).topics
    commands = sorted(t for t in names if t.startswith(prefix))
    fold = [settings.topic(RUN_EVENTS), settings.topic(TOOL_RESULTS)]
    return [t for t in fold if t in names], commands


def read(
    settings: Settings,
    since: datetime | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout_s: float = 600.0,
) -> Read:
    """Read every partition of the run topics from its start (or ``since``, where the broker can seek by
    time) to its end as of now."""
    fold_topics, command_topics = run_topics(settings)
    topics = fold_topics + command_topics
    meta = admin(settings).list_topics(timeout=10).topics
    partitions = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in sorted(meta[t].partitions)]
    out = Read()
    if not partitions:
        return out
    started = time.monotonic()
    c = make_consumer(
        settings,
        f"replay.{uuid.uuid4().hex[:12]}",  # never joined (assign), never committed: a name only
        **{"enable.partition.eof": True, "fetch.wait.max.ms": 10, "queued.min.messages": 100_000},
    )
    try:
        if since is not None:
            # On Apache Kafka this skips what came before; the embedded broker answers offset 0 for any
            # time (BROKER-NOTES), so there the whole log is read and runs are chosen by their request.
            at = int(since.timestamp() * 1000) - SEEK_SLACK_MS
            wanted = [TopicPartition(tp.topic, tp.partition, max(at, 0)) for tp in partitions]
            found = c.offsets_for_times(wanted, timeout=10)
            partitions = [
                TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END) for tp in found
            ]
        c.assign(partitions)
        remaining = {(tp.topic, tp.partition) for tp in partitions}
        ends: dict[tuple[str, int], int] = {}
        starts: dict[tuple[str, int], int] = {}
        commands = set(command_topics)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {sorted(remaining)} to its end in {timeout_s:.0f}s")
            for msg in c.consume(2000, 0.2):
                key = (msg.topic(), msg.partition())
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if key in remaining:
                            remaining.discard(key)
                            out.cut[key] = msg.offset()
                            c.pause([TopicPartition(*key)])
                        continue
                    raise RuntimeError(f"reading {key[0]}[{key[1]}]: {err.str()}")
                if key not in remaining:
                    continue  # past the cut (a record that landed after this partition's EOF)
                if key not in ends:
                    starts[key] = msg.offset()
                    ends[key] = c.get_watermark_offsets(TopicPartition(*key), cached=True)[1]
                (out.commands if key[0] in commands else out.fold).append(msg)
            if progress is not None:
                known = sum(ends[k] - starts[k] for k in ends) if len(ends) == len(partitions) else None
                progress(out.count, known)
    finally:
        c.close()
    out.seconds = time.monotonic() - started
    return out


def whole_topic(
    settings: Settings, topic: str, partitions: list[int], name: str, timeout_s: float, *, to_the_end: bool = True
) -> Iterator[Message]:
    """Every record of ``topic``'s ``partitions`` from the beginning to its end, without a group (nothing
    committed). Past ``timeout_s`` it raises ``TimeoutError``, or with ``to_the_end=False`` stops with
    what it read."""
    c = make_consumer(settings, name, **{"enable.partition.eof": True, "fetch.wait.max.ms": 10})
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        remaining = set(partitions)
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            for msg in c.consume(2000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(msg.partition())
                    continue
                yield msg
        if remaining and to_the_end:
            raise TimeoutError(f"could not read {topic} to its end")
    finally:
        c.close()


def fold_order(messages: list[Message]) -> list[Message]:
    """Per partition number, the events and results merged by timestamp (then topic, then offset)."""
    by_partition: dict[int, dict[str, list[Message]]] = {}
    for m in messages:
        by_partition.setdefault(m.partition(), {}).setdefault(m.topic(), []).append(m)
    ordered: list[Message] = []
    for partition in sorted(by_partition):
        streams = [sorted(ms, key=lambda m: m.offset()) for ms in by_partition[partition].values()]
        ordered += heapq.merge(*streams, key=_when)
    return ordered


def _when(m: Message) -> tuple[int, str, int]:
    return (m.timestamp()[1], m.topic(), m.offset())


def batches(messages: list[Message], size: int) -> Iterator[list[Message]]:
    for i in range(0, len(messages), size):
        yield messages[i : i + size]
