"""``true_highwaters`` on what Tansu never shows: partitions whose records retention deleted."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import TopicPartition

from streamagent import faust_compat
from streamagent.config import Settings


class _FakeConsumer:
    """Lists (low, high) per partition; a fetch returns nothing (every record is gone)."""

    def __init__(self, watermarks: dict[tuple[str, int], tuple[int, int]]) -> None:
        self.watermarks = watermarks
        self.assigned: list[TopicPartition] = []

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = 0, cached: bool = False) -> tuple[int, int]:
        return self.watermarks[(tp.topic, tp.partition)]

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = tps

    def poll(self, timeout: float) -> None:
        return None

    def close(self) -> None:
        pass


def test_a_partition_emptied_by_retention_ends_at_its_listed_end(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeConsumer({("t", 0): (0, 0), ("t", 1): (120, 120)})

    def make(conf: dict[str, Any]) -> _FakeConsumer:
        return fake

    monkeypatch.setattr(faust_compat, "Consumer", make)
    ends = faust_compat.true_highwaters(Settings(bootstrap_servers="unused:9092"), [("t", 0), ("t", 1)], timeout_s=0.2)
    assert ends == {("t", 0): 0, ("t", 1): 120}
    assert fake.assigned == []  # nothing to fetch, so no wait for a record that is gone
