"""Checkpoints of the state table, so a member taking over a partition reads live runs, not history.

Faust recovers a table by reading its changelog from the store's ``persisted_offset`` on. The memory
store has none, so every takeover read the whole changelog; and the embedded broker never compacts
it (BROKER-NOTES), so that read grew with every run ever folded, ended runs and tombstones included.

``CheckpointedStore`` is faust's memory store with a persisted offset: every
``state_checkpoint_interval_s`` the worker writes, per owned partition, one record holding that
partition's runs and the changelog offset they cover to a checkpoint topic (keyed by partition).
When a partition is assigned, the store loads the partition's last checkpoint and tells faust to
read the changelog only after its offset. Recovery then costs the runs the checkpoint holds (live
runs and runs within ``state_retention_s`` of their end) plus the changelog written since.

Why a Kafka topic and not PostgreSQL: the state processor depends on Kafka only, and the last
record of a partition can be read without reading the partition (the last batch is fetched, as
``faust_compat.true_highwaters`` does); on Apache Kafka the topic is compacted as well.

Consistency: a checkpoint's offset is read *before* its runs are copied. Every changelog record at
or below that offset was acknowledged, so its run was put into the store before it (a run is put,
then produced): the copy holds it, or a newer value whose record lies after the offset and is
read again at recovery (the last value wins). A checkpoint whose offset is not below the
changelog's end (the broker lost its data, e.g. the memory engine restarted) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from faust.stores.memory import Store as MemoryStore

from streamagent.config import Settings
from streamagent.kafka import client_config

log = logging.getLogger(__name__)


def checkpoint_topic(settings: Settings) -> str:
    """Named beside the table's changelog (``<app id>-runs-changelog``)."""
    return f"{settings.group('state')}-runs-checkpoint"


def digest(key: bytes | None, value: bytes | None) -> str:
    """What identifies one changelog record: a checkpoint names the record its offset ends on, so a
    changelog deleted and written anew (a wipe and ``replay --apply``) is not mistaken for the old one."""
    return hashlib.blake2b((key or b"") + b"\0" + (value if value is not None else b"\1"), digest_size=12).hexdigest()


def encode(offset: int, ends_on: str, runs: dict[str, bytes]) -> bytes:
    body = {"offset": offset, "ends_on": ends_on, "runs": {k: v.decode() for k, v in runs.items()}}
    return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 1)


def decode(value: bytes) -> tuple[int, str, dict[str, bytes]]:
    body = json.loads(zlib.decompress(value))
    return int(body["offset"]), str(body["ends_on"]), {k: v.encode() for k, v in body["runs"].items()}


def records_at(
    settings: Settings, topic: str, offsets: dict[int, int], timeout_s: float = 15.0
) -> dict[int, str | None]:
    """The digest of the record at each partition's given offset (None: there is none), one consumer."""
    if not offsets:
        return {}
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": "streamagent-checkpoint-reader",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "auto.offset.reset": "error",
            "enable.partition.eof": True,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in offsets.items()])
        out: dict[int, str | None] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < len(offsets) and time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            if msg is None or msg.partition() in out:
                continue
            if msg.error():
                out[msg.partition()] = None  # past the end, or out of range: not the checkpoint's record
            elif msg.offset() == offsets[msg.partition()]:
                out[msg.partition()] = digest(msg.key(), msg.value())
        return out
    finally:
        consumer.close()


def last_records(
    settings: Settings, topic: str, partitions: Iterable[int], timeout_s: float = 15.0
) -> dict[int, bytes | None]:
    """The last record's value of each partition, read from its last batch only (None: empty)."""
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": "streamagent-checkpoint-reader",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "auto.offset.reset": "earliest",
            "fetch.message.max.bytes": 64 * 1024 * 1024,
        }
    )
    try:
        out: dict[int, bytes | None] = {}
        starts = []
        for p in partitions:
            low, listed = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if listed <= low:
                out[p] = None
            else:
                # ListOffsets answers "start of the last batch + 1" on the embedded broker and the
                # true end on Kafka: one before it is inside the last batch either way.
                starts.append(TopicPartition(topic, p, listed - 1))
        if not starts:
            return out
        consumer.assign(starts)
        pending = {tp.partition for tp in starts}
        last: dict[int, bytes | None] = {}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            p = msg.partition()
            last[p] = msg.value()
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
            if msg.offset() >= high - 1:
                pending.discard(p)
        if pending:
            raise TimeoutError(f"could not read the last checkpoint of {topic} {sorted(pending)}")
        return {**out, **last}
    finally:
        consumer.close()


class CheckpointedStore(MemoryStore):
    """faust's memory store that starts recovery from the partition's last checkpoint.

    ``loader`` (set by the state app) reads checkpoints: ``loader(partitions) -> {partition: (offset,
    runs)}``; ``partition_of`` says which partition a key belongs to.
    """

    loader: Callable[[list[int]], dict[int, tuple[int, str, dict[str, bytes]]]] | None = None
    partition_of: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.persisted: dict[int, int] = {}  # changelog partition -> offset the loaded checkpoint covers
        self.applied: dict[int, tuple[int, str]] = {}  # changelog partition -> (offset, digest) recovery applied last
        # changelog partition -> (offset, digest) of the last record this process wrote and the broker
        # acknowledged (``store.FaustTableStore.written``, shared: the state app sets it).
        self.written: dict[int, tuple[int, str]] = {}
        self.recovered_records = 0  # changelog records applied by recovery (tests: bounded by live runs)
        self.loaded_runs = 0  # runs loaded from checkpoints

    def persisted_offset(self, tp: Any) -> int | None:
        """Where recovery of a partition starts (after this offset): what the store already holds.

        For a partition just assigned, that is its checkpoint. For one this member kept through a
        rebalance (eager: every rebalance recovers every assigned partition), it is also every record
        the store applied or wrote itself since: without them the kept partition was read again from
        its checkpoint, or from the start (29,188 changelog records in one rebalance of a 2-member
        ``bench/scale.py`` run, 2026-12-07)."""
        p = tp.partition
        held = (self.persisted.get(p), self.applied.get(p, (None, ""))[0], self.written.get(p, (None, ""))[0])
        offsets = [o for o in held if o is not None]
        return max(offsets) if offsets else None

    def apply_changelog_batch(self, batch: Iterable[Any], to_key: Any, to_value: Any) -> None:
        events = list(batch)
        self.recovered_records += len(events)
        for event in events:
            m = event.message
            if m.offset > self.applied.get(m.partition, (-1, ""))[0]:
                self.applied[m.partition] = (m.offset, digest(m.key, m.value))
        super().apply_changelog_batch(events, to_key, to_value)

    async def on_rebalance(self, assigned: Any, revoked: Any, newly_assigned: Any, generation_id: int = 0) -> None:
        changelog = self.table.changelog_topic.get_topic_name()
        fresh = sorted(tp.partition for tp in newly_assigned if tp.topic == changelog)
        gone = {tp.partition for tp in revoked if tp.topic == changelog}
        self._drop({*fresh, *gone})
        for p in {*fresh, *gone}:
            # Dropped from memory: what this process once applied or wrote there is no longer held.
            self.persisted.pop(p, None)
            self.applied.pop(p, None)
            self.written.pop(p, None)
        if not fresh or self.loader is None:
            return
        import asyncio

        try:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self.loader, fresh)
        except Exception as exc:  # no checkpoint to be had: recover from the whole changelog, as before
            log.warning("state checkpoints not read, recovering from the whole changelog: %r", exc)
            return
        for p, (offset, ends_on, runs) in loaded.items():
            self.data.update(runs)
            self.persisted[p] = offset
            self.applied[p] = (offset, ends_on)
            self.loaded_runs += len(runs)
        log.info(
            "state checkpoints loaded",
            extra={"partitions": sorted(loaded), "runs": sum(len(r) for _, _, r in loaded.values())},
        )

    def _drop(self, partitions: set[int]) -> None:
        """Forget the keys of partitions (re)assigned or revoked: a stale copy must not outlive a takeover."""
        if not partitions or self.partition_of is None:
            return
        for key in [k for k in self.data if self.partition_of(k) in partitions]:
            del self.data[key]
            self._key_partition.pop(key, None)
