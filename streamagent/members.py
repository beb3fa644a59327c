"""Who is in each consumer group, announced by the members themselves.

Kafka's own answer (DescribeConsumerGroups, with ListOffsets for the lag) does not work on the
embedded broker: it shows every group with 0 members, and its ListOffsets high-water mark is the
start of the last record batch + 1 (BROKER-NOTES). So every member says for itself, on the compacted
members topic, which partitions it owns, its lag on each (from the high-water mark carried in fetch
responses, which is right on both brokers) and how many messages it has processed: at every
rebalance, every ``member_report_s`` and once more when it leaves. ``streamagent status`` folds the
last announcement per (group, member); one unheard of for ``member_lease_s`` is shown as gone (it was
killed, or its machine died). The same works unchanged on Apache Kafka.

The announcements are operational, not part of any run: JSON validated by ``MemberStatus`` (a reader
skips what does not validate), so that an operator can read them with any Kafka tool.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamagent.config import Settings
from streamagent.topics import MEMBERS

log = logging.getLogger(__name__)


class PartitionStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int = Field(ge=0)
    # Next offset this member will read, and the partition's high-water mark as the last fetch reported
    # it; None where the member has not fetched from it yet.
    position: int | None = None
    lag: int | None = None


class MemberStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    group: str  # the group's logical name: decision, state, tool.jira, ...
    member: str  # its instance id (settings.instance_id), else host-pid
    host: str
    pid: int
    state: Literal["up", "left"]
    partitions: list[PartitionStatus] = Field(default_factory=list)
    processed: int = Field(0, ge=0, description="messages this process has handled since it started")
    rebalances: int = Field(0, ge=0, description="assignment changes this process has seen")
    started_at_ms: int
    at_ms: int
    lease_ms: int = Field(gt=0)

    def key(self) -> bytes:
        return f"{self.group}/{self.member}".encode()

    def gone(self, now_ms: int) -> bool:
        return self.state == "left" or now_ms - self.at_ms > self.lease_ms

    @property
    def lag(self) -> int | None:
        lags = [p.lag for p in self.partitions if p.lag is not None]
        return sum(lags) if lags else None


def member_name(settings: Settings) -> str:
    return settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"


class MemberAnnouncer:
    """One member's announcements, whatever its Kafka client: the caller passes what its consumer owns."""

    def __init__(self, settings: Settings, producer: Any, group: str) -> None:
        self.settings = settings
        self.producer = producer
        self.group = group
        self.topic = settings.topic(MEMBERS)
        self.member = member_name(settings)
        self.host = socket.gethostname()
        self.started_at_ms = int(time.time() * 1000)
        self.processed = 0
        self.rebalances = 0
        self._next = 0.0

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self._next

    def next_soon(self) -> None:
        """Announce at the next chance (after a rebalance: outside the client's callback)."""
        self._next = 0.0

    def announce(self, partitions: list[PartitionStatus], state: Literal["up", "left"] = "up") -> MemberStatus:
        """Produce this member's status (not flushed: the caller's next flush carries it)."""
        status = MemberStatus(
            group=self.group,
            member=self.member,
            host=self.host,
            pid=os.getpid(),
            state=state,
            partitions=sorted(partitions, key=lambda p: (p.topic, p.partition)),
            processed=self.processed,
            rebalances=self.rebalances,
            started_at_ms=self.started_at_ms,
            at_ms=int(time.time() * 1000),
            lease_ms=int(self.settings.member_lease_s * 1000),
        )
        self._next = time.monotonic() + self.settings.member_report_s
        try:
            self.producer.produce(self.topic, key=status.key(), value=status.model_dump_json().encode())
        except Exception as exc:  # a full queue during an outage: the next announcement says the same
            log.warning("member announcement not sent: %r", exc)
        return status


def confluent_partitions(consumer: Any, topics: list[str] | None = None) -> list[PartitionStatus]:
    """What a confluent-kafka consumer owns, with its position and the lag the last fetch reported
    (``get_watermark_offsets(cached=True)``: no request, and not the broker's wrong ListOffsets)."""
    try:
        assigned = [tp for tp in consumer.assignment() if topics is None or tp.topic in topics]
        positions = consumer.position(assigned) if assigned else []
    except Exception as exc:  # closed, or the broker gone: nothing to say this time
        log.debug("assignment not read: %r", exc)
        return []
    out = []
    for tp in positions:
        position = tp.offset if tp.offset >= 0 else None
        lag = None
        try:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and position is not None:
                lag = max(0, high - position)
        except Exception:  # not fetched from yet
            pass
        out.append(PartitionStatus(topic=tp.topic, partition=tp.partition, position=position, lag=lag))
    return out


def faust_partitions(consumer: Any, topics: list[str]) -> list[PartitionStatus]:
    """The same for a faust (aiokafka) consumer: its assignment of ``topics`` (not the table's changelog,
    which faust also assigns, as standby), the offset it read last, and the high-water mark of the last
    fetch (``highwater``)."""
    out = []
    try:
        read = getattr(consumer, "_read_offset", {})
        for tp in consumer.assignment():
            if tp.topic not in topics:
                continue
            last = read.get(tp) if hasattr(read, "get") else None
            position = last + 1 if last is not None else None
            high = consumer.highwater(tp)
            lag = max(0, high - position) if high is not None and position is not None else None
            out.append(PartitionStatus(topic=tp.topic, partition=tp.partition, position=position, lag=lag))
    except Exception as exc:  # mid-rebalance: said at the next announcement
        log.debug("assignment not read: %r", exc)
        return []
    return out


def fold_members(records: list[tuple[bytes | None, bytes | None]]) -> dict[str, MemberStatus]:
    """The last valid announcement per key (the topic is compacted, but the embedded broker keeps every
    version); a record that does not validate is skipped and logged."""
    members: dict[str, MemberStatus] = {}
    for key, value in records:
        if key is None:
            continue
        name = key.decode(errors="replace")
        if value is None:
            members.pop(name, None)
            continue
        try:
            members[name] = MemberStatus.model_validate_json(value)
        except ValidationError as exc:
            log.warning("member announcement %s skipped: %s", name, exc.errors()[0].get("msg"))
    return members


def read_members(settings: Settings, timeout_s: float = 10.0) -> dict[str, MemberStatus]:
    """Every member's last announcement, read from the start of the members topic to its end."""
    from confluent_kafka import KafkaError

    from streamagent.kafka import table_reader

    consumer, partitions = table_reader(settings, settings.topic(MEMBERS), "status")
    records: list[tuple[bytes | None, bytes | None]] = []
    try:
        left = set(partitions)
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        left.discard(msg.partition())
                    continue
                records.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return fold_members(records)
