"""Operator tools for the dead-letter topic: read it, and put chosen letters back."""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, TopicPartition

from streamagent.config import Settings
from streamagent.dlq import DeadLetter
from streamagent.kafka import admin, consumer, producer
from streamagent.topics import DEAD_LETTERS


def read_dead_letters(settings: Settings, reason: str | None = None, timeout_s: float = 10.0) -> list[DeadLetter]:
    """Read the whole dead-letter topic from the beginning (assign, no group, nothing committed)."""
    topic = settings.topic(DEAD_LETTERS)
    meta = admin(settings).list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    c = consumer(settings, "dlq-reader", **{"enable.partition.eof": True})
    try:
        c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        remaining = set(meta.partitions)
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + timeout_s
        # Partition EOF (from the fetch response's high-water mark, which the embedded broker
        # reports correctly) tells when each partition has been read to its end.
        while remaining and time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    remaining.discard(msg.partition())
                continue
            letter = DeadLetter.from_message(msg)
            if reason is None or letter.reason == reason:
                letters.append(letter)
        return sorted(letters, key=lambda x: (x.at_ms, x.dlq_partition, x.dlq_offset))
    finally:
        c.close()


def replay(settings: Settings, letters: list[DeadLetter]) -> int:
    """Produce each letter's original key and value to its source topic, unchanged."""
    p = producer(settings)
    for letter in letters:
        p.produce(letter.source_topic, key=letter.key, value=letter.value, headers=letter.replay_headers())
    remaining = p.flush(30)
    if remaining:
        raise RuntimeError(f"{remaining} dead letters were not acknowledged")
    return len(letters)
