"""The tool catalogue as it was at a moment in the past: the registry topic folded up to that moment.

A decision replay re-decides each recorded decision with the catalogue the live decision processor had
then (which tools had a live member, their input schemas, which declare that every call needs a
person). The live processor folds the registry topic with ``CatalogueState`` and judges liveness at its
wall clock; here the same fold takes the records stamped at or before the decision's moment, and
liveness is judged at that moment.

When that is not known exactly, this says so rather than guess. The registry is a compacted topic:
compaction removes a key's older records (a member's earlier heartbeats, a tool's earlier versions),
which shows as a gap in a partition's offsets. What a gap removed came after the record before it, so
the catalogue is known exactly up to the first gapped record's time, and not from then on (a partition
that no longer starts at offset 0 is not known at any time). Apache Kafka keeps records younger than
the topic's ``min.compaction.lag.ms`` uncompacted: that is how far back decisions can be re-decided.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise

from confluent_kafka import Message

from streamagent.catalogue import CatalogueState, ToolEntry, Undecodable, decode
from streamagent.config import Settings
from streamagent.events import DecisionAction, DecisionRecorded
from streamagent.kafka import admin
from streamagent.topics import TOOL_REGISTRY

from .source import whole_topic


@dataclass(frozen=True)
class Record:
    timestamp_ms: int
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class RegistryHistory:
    """The registry's records in time order; ``move_to(ms)`` sets the moment ``entry_of`` answers for.

    Decisions are replayed in the order they were recorded, so the fold moves forward one record at a
    time; a moment earlier than the last one folds again from the start.
    """

    def __init__(self, records: list[Record], default_lease_ms: int) -> None:
        self.records = sorted(records, key=lambda r: (r.timestamp_ms, r.partition, r.offset))
        self.default_lease_ms = default_lease_ms
        self.exact_before_ms = _exact_before(records)
        self._state = CatalogueState(default_lease_ms)
        self._next = 0
        self._at_ms = -1

    def move_to(self, moment: datetime) -> None:
        ms = int(moment.timestamp() * 1000)
        if ms < self._at_ms:
            self._state, self._next = CatalogueState(self.default_lease_ms), 0
        while self._next < len(self.records) and self.records[self._next].timestamp_ms <= ms:
            r = self.records[self._next]
            # Undecodable records change nothing, as live (where they are dead-lettered).
            self._state.apply(r.key, r.value, received_ms=r.timestamp_ms if r.timestamp_ms > 0 else None)
            self._next += 1
        self._at_ms = ms

    def entry_of(self, name: str) -> ToolEntry | None:
        """As ``Catalogue.available``: the tool's entry while it had a live member at the moment, else None."""
        entry = self._state.entry(name, self._at_ms)
        return entry if entry is not None and entry.available else None

    def unknown_at(self, moment: datetime) -> str | None:
        """Why the catalogue at ``moment`` is not known exactly; None when it is."""
        if self.exact_before_ms is None or moment.timestamp() * 1000 < self.exact_before_ms:
            return None
        if self.exact_before_ms < 0:
            return "the registry topic's oldest records are gone (compacted or deleted)"
        since = datetime.fromtimestamp(self.exact_before_ms / 1000, UTC).isoformat(timespec="seconds")
        return f"the registry topic's records from {since} on were compacted"


def _exact_before(records: list[Record]) -> int | None:
    """The time from which some record is missing (-1: from the start); None: nothing is missing."""
    by_partition: dict[int, list[Record]] = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(r)
    horizons: list[int] = []
    for rs in by_partition.values():
        rs.sort(key=lambda r: r.offset)
        if rs[0].offset != 0:
            return -1
        horizons += [before.timestamp_ms for before, after in pairwise(rs) if after.offset != before.offset + 1]
    return min(horizons) if horizons else None


def read_registry(settings: Settings, timeout_s: float = 120.0) -> RegistryHistory:
    """Every record of the registry topic, from the start to its end now."""
    topic = settings.topic(TOOL_REGISTRY)
    meta = admin(settings).list_topics(timeout=10).topics.get(topic)
    records: list[Record] = []
    if meta is not None:
        for msg in whole_topic(settings, topic, sorted(meta.partitions), "replay.registry", timeout_s):
            records.append(Record(_sent_ms(msg.key(), msg.value(), msg.timestamp()[1]), *_where(msg)))
    return RegistryHistory(records, int(settings.registry_lease_s * 1000))


def _where(msg: Message) -> tuple[int, int, bytes | None, bytes | None]:
    return msg.partition(), msg.offset(), msg.key(), msg.value()


def _sent_ms(key: bytes | None, value: bytes | None, stamp: int) -> int:
    """When the member sent it: its own clock (``at_ms``), on which the fold judges liveness too; the
    record's timestamp for the original format, which has none (and for what does not decode)."""
    try:
        announcement = decode(key, value)
    except Undecodable:
        return stamp
    return announcement.at_ms if announcement is not None and announcement.at_ms is not None else stamp


def saw_otherwise(record: DecisionRecorded, entry_of: Callable[[str], object | None]) -> str | None:
    """Where the catalogue rebuilt for ``record`` contradicts what the decision recorded it saw (the
    tools its context lists as available; the tool it waited for): None when it does not. A
    contradiction is an announcement that reached the live catalogue after the decision's moment, or
    a registry record lost."""
    seen = record.context.get("available_tools")
    missing = sorted(t for t in seen if entry_of(t) is None) if isinstance(seen, list) else []
    if missing:
        return f"the decision saw {', '.join(missing)} available; the registry shows no live member then"
    waited = record.action is DecisionAction.wait and record.tool is not None
    if waited and entry_of(record.tool or "") is not None:
        return f"the decision waited for {record.tool}; the registry shows it available then"
    return None
