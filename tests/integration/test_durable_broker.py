"""The durable embedded broker: kill -9 it, start it on the same data dir, and the log is the same.

Real Tansu behind the journal proxy, real confluent-kafka clients; nothing is mocked.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streamagent.console.devstack.broker.journal import JOURNAL_FILE, JournalWriter, Offset, Records, scan
from streamagent.console.devstack.embedded import EmbeddedBroker

pytestmark = pytest.mark.integration

TOPICS = {"durable.a": 4, "durable.b": 2}


def _produce(bootstrap: str, producer_id: int, count: int) -> None:
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 5,
            "partitioner": "murmur2_random",
        }
    )
    for i in range(count):
        topic = "durable.a" if i % 3 else "durable.b"
        headers = [("run", f"r{i % 17}".encode()), ("dup", b"1"), ("dup", b"2"), ("nil", None)]
        key = None if i % 11 == 0 else f"key-{i % 29}".encode()
        p.produce(topic, key=key, value=os.urandom(i % 300), headers=headers, timestamp=1_700_000_000_000 + i)
        if i % 250 == 0:
            p.flush(10)  # many batches, not one
    assert p.flush(10) == 0


def _snapshot(bootstrap: str) -> list[tuple[object, ...]]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.partition.eof": True})
    try:
        assigned = [TopicPartition(t, p, 0) for t, n in TOPICS.items() for p in range(n)]
        c.assign(assigned)
        left = {(tp.topic, tp.partition) for tp in assigned}
        out = []
        while left:
            msg = c.poll(5)
            assert msg is not None, f"no end reached on {left}"
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                left.discard((msg.topic(), msg.partition()))
                continue
            out.append(
                (msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.headers(), msg.timestamp())
            )
        return sorted(out, key=lambda m: (m[0], m[1], m[2]))
    finally:
        c.close()


def _consume_and_commit(bootstrap: str, group: str, how_many: int) -> dict[tuple[str, int], int]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    try:
        c.subscribe(list(TOPICS))
        seen = 0
        while seen < how_many:
            msg = c.poll(5)
            if msg is not None and not msg.error():
                seen += 1
        c.commit(asynchronous=False)
        committed = c.committed([TopicPartition(t, p) for t, n in TOPICS.items() for p in range(n)], timeout=10)
        return {(tp.topic, tp.partition): tp.offset for tp in committed}
    finally:
        c.close()


def _committed(bootstrap: str, group: str, topics: dict[str, int] = TOPICS) -> dict[tuple[str, int], int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        committed = c.committed([TopicPartition(t, p) for t, n in topics.items() for p in range(n)], timeout=10)
        return {(tp.topic, tp.partition): tp.offset for tp in committed}
    finally:
        c.close()


def _kill_hard(broker: EmbeddedBroker) -> None:
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGKILL)
    broker.stop()  # reaps it; its tansu child dies with it (PR_SET_PDEATHSIG)


def test_a_killed_broker_comes_back_with_the_same_log_and_offsets(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "broker", storage="journal").start()
    bootstrap = broker.bootstrap_servers
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, n, 1) for t, n in TOPICS.items()]).values():
        future.result()
    _produce(bootstrap, 1, 1500)
    _produce(bootstrap, 2, 1500)  # a second producer id writing the same partitions
    committed = _consume_and_commit(bootstrap, "durable-group", 1000)
    before = _snapshot(bootstrap)
    assert len(before) == 3000

    _kill_hard(broker)
    restarted = EmbeddedBroker(tmp_path / "broker", storage="journal", port=broker.port).start()
    try:
        after = _snapshot(restarted.bootstrap_servers)
        assert after == before  # same offsets, same order, same keys, values, headers and timestamps
        assert _committed(restarted.bootstrap_servers, "durable-group") == committed
        # And the restored broker takes new work at the next offsets.
        _produce(restarted.bootstrap_servers, 3, 30)
        assert len(_snapshot(restarted.bootstrap_servers)) == 3030
    finally:
        restarted.stop()


def test_memory_storage_forgets_on_restart(tmp_path: Path) -> None:
    """The contrast the journal exists for (and why the suite's shared broker may use memory)."""
    broker = EmbeddedBroker(tmp_path / "broker", storage="memory").start()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    for future in admin.create_topics([NewTopic("durable.a", 1, 1)]).values():
        future.result()
    broker.stop()
    broker.start()
    try:
        topics = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=10).topics
        assert "durable.a" not in topics
    finally:
        broker.stop()


def _one_batch(count: int, first: int) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 16,
    )
    for i in range(count):
        builder.append(i, timestamp=1_700_000_000_000 + first + i, key=b"k", value=f"v{first + i}".encode(), headers=[])
    return bytes(builder.build())


def _values(bootstrap: str, topic: str) -> list[tuple[int, bytes]]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "hole-reader", "enable.partition.eof": True})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        out = []
        while True:
            msg = c.poll(5)
            assert msg is not None, "no end of partition reached"
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                return out
            out.append((msg.offset(), msg.value()))
    finally:
        c.close()


def test_a_hole_in_the_journal_moves_later_batches_down_and_their_commits_with_them(tmp_path: Path) -> None:
    """A cut can leave a later batch journalled and an earlier, never acknowledged one not. The later
    batches are restored lower down; groups resume where their records now are, not past them; and
    the journal is rewritten in the new numbering, so the next restart restores the same log."""
    broker = EmbeddedBroker(tmp_path / "broker", storage="journal").start()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    for future in admin.create_topics([NewTopic("holes", 1, 1)]).values():
        future.result()
    broker.stop()
    journal = tmp_path / "broker" / JOURNAL_FILE
    writer = JournalWriter(journal, fsync=False)
    writer.append(Records("holes", 0, 0, _one_batch(3, 0)))  # offsets 0-2
    writer.append(Records("holes", 0, 5, _one_batch(2, 5)))  # 5-6: 3-4 were never journalled
    writer.append(Offset("behind-the-hole", "holes", 0, 6, None))  # read 5, next is 6
    writer.append(Offset("in-the-hole", "holes", 0, 4, None))  # read up to 3 (never restored)
    writer.append(Offset("read-everything", "holes", 0, 7, None))
    writer.close()

    for attempt in range(2):  # the second start restores the rewritten journal: same answer
        restarted = EmbeddedBroker(tmp_path / "broker", storage="journal", port=broker.port).start()
        try:
            assert _values(restarted.bootstrap_servers, "holes") == [
                (0, b"v0"),
                (1, b"v1"),
                (2, b"v2"),
                (3, b"v5"),
                (4, b"v6"),
            ], attempt
            for group, expected in (("behind-the-hole", 4), ("in-the-hole", 3), ("read-everything", 5)):
                assert _committed(restarted.bootstrap_servers, group, {"holes": 1}) == {("holes", 0): expected}, (
                    group,
                    attempt,
                )
        finally:
            restarted.stop()
    assert [e.base_offset for e in scan(journal)[0] if isinstance(e, Records)] == [0, 3]


def test_a_topic_the_broker_created_on_first_use_and_a_deleted_one_do_not_stop_a_restart(tmp_path: Path) -> None:
    # No CreateTopics for "durable.auto": the broker makes it on the first produce (a tool's command topic
    # did this). "durable.gone" is created, read by a group, then deleted: its group offset outlives it.
    broker = EmbeddedBroker(tmp_path / "broker", storage="journal").start()
    bootstrap = broker.bootstrap_servers
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic("durable.gone", 1, 1)]).values():
        future.result()
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(20):
        p.produce("durable.auto", value=f"a{i}".encode(), partition=i % 4)
        p.produce("durable.gone", value=f"g{i}".encode())
    assert p.flush(10) == 0
    auto = {"durable.auto": 4}
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "auto-group", "enable.auto.commit": False})
    c.assign([TopicPartition("durable.auto", n, 2) for n in range(4)] + [TopicPartition("durable.gone", 0, 7)])
    c.commit(offsets=c.assignment(), asynchronous=False)
    c.close()
    for future in admin.delete_topics(["durable.gone"]).values():
        future.result()

    _kill_hard(broker)
    restarted = EmbeddedBroker(tmp_path / "broker", storage="journal", port=broker.port).start()
    try:
        assert _committed(restarted.bootstrap_servers, "auto-group", auto) == {("durable.auto", n): 2 for n in range(4)}
        reader = Consumer(
            {"bootstrap.servers": restarted.bootstrap_servers, "group.id": "r", "enable.partition.eof": True}
        )
        reader.assign([TopicPartition("durable.auto", n, 0) for n in range(4)])
        values, ends = set(), 0
        while ends < 4:
            msg = reader.poll(5)
            assert msg is not None, "no end reached"
            if msg.error():
                ends += 1
            else:
                values.add(msg.value())
        reader.close()
        assert values == {f"a{i}".encode() for i in range(20)}
    finally:
        restarted.stop()
