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


def test_faust_commits_the_offsets_the_application_settled_not_its_acknowledgements() -> None:
    from collections import defaultdict

    from faust.transport import consumer as base
    from faust.types import TP
    from intervaltree import IntervalTree

    class App:
        pass

    settled = {("events", 0): 7, ("events", 1): 3}
    app = App()
    faust_compat.commit_from(app, settled.get)  # patches faust's consumer class once per process

    class Consumer:
        # faust's own commit arithmetic, on the state a faust consumer keeps.
        _new_offset = base.Consumer._new_offset
        _should_commit = base.Consumer._should_commit
        _filter_committable_offsets = base.Consumer._filter_committable_offsets

        def __init__(self, app: App) -> None:
            self.app = app
            self._acked: dict[TP, list[int]] = defaultdict(list)
            self._acked_index: dict[TP, set[int]] = defaultdict(set)
            self._gap: dict[TP, IntervalTree] = defaultdict(IntervalTree)
            self._committed_offset: dict[TP, int | None] = defaultdict(lambda: None)

    consumer = Consumer(app)
    a, b, c = TP("events", 0), TP("events", 1), TP("events", 2)
    # faust holds acknowledgements up to 40 on partition 0 (it took skipped offsets for a hole); only 7 was folded.
    consumer._acked[a] = list(range(0, 41))
    consumer._acked_index[a] = set(range(0, 41))
    consumer._committed_offset[b] = 5  # already past what this member settled (another member's work)
    assert consumer._filter_committable_offsets([a, b, c]) == {a: 7}
    assert consumer._acked[a] == [] and consumer._acked_index[a] == set()  # the lists do not grow

    # A faust app without a source keeps faust's arithmetic.
    other = Consumer(App())
    other._acked[a] = [0, 1, 2, 4]
    assert other._filter_committable_offsets([a]) == {a: 3}
