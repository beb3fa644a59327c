"""Consumer lag and hop latency, as a confluent consumer of the runtime reports them, on the real broker."""

from __future__ import annotations

import json

from helpers import eventually
from prometheus_client import REGISTRY
from test_consumer_runtime import NAME, Recorder, committed, ends, events, produce, running, runtime_for
from test_consumer_runtime import settings as settings  # its fixture: a short group session
from test_consumer_runtime import source as source  # its fixture: the topics

from streamagent.config import Settings
from streamagent.kafka import consumer as make_consumer
from streamagent.metrics import CONSUMER_LAG, LagFromStatistics


def lags(group: str, topic: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for family in CONSUMER_LAG.collect():
        for sample in family.samples:
            if sample.labels["group"] == group and sample.labels["topic"] == topic:
                out[int(sample.labels["partition"])] = sample.value
    return out


def test_lag_is_committed_offset_to_high_watermark_per_partition(settings: Settings, source: str) -> None:
    settings = settings.model_copy(update={"consumer_lag_interval_s": 0.2})
    group = settings.group(NAME)
    produced = produce(settings, source, events(0, 12))
    with running(runtime_for(settings, source, Recorder())):
        eventually(lambda: committed(settings, source) == ends(produced), timeout=30, what="offsets committed")
        caught_up = eventually(
            lambda: (got := lags(group, source)).keys() >= ends(produced).keys() and not any(got.values()) and got,
            timeout=30,
            what="lag 0 on every partition with data",
        )
    assert set(caught_up) <= set(range(settings.partitions))
    # Every consumed event's age was observed once (they occurred in 2025: all in the top bucket).
    hops = {"processor": NAME, "topic": source}
    assert REGISTRY.get_sample_value("streamagent_hop_seconds_count", hops) == 12
    assert REGISTRY.get_sample_value("streamagent_hop_seconds_bucket", {**hops, "le": "300.0"}) == 0

    # Seven more, read by a member of the same group that never commits: the group is 7 behind.
    more = produce(settings, source, events(100, 7))
    reader = make_consumer(settings, NAME)
    reader.subscribe([source])
    try:

        def behind() -> dict[int, float] | None:
            reader.consume(10, timeout=0.2)
            got = lags(group, source)
            return got if sum(got.values()) == 7 else None

        got = eventually(behind, timeout=30, what="a lag of 7")
    finally:
        reader.close()
    expected: dict[int, int] = {}
    for p in more:
        expected[p.partition] = expected.get(p.partition, 0) + 1
    assert {p: v for p, v in got.items() if v} == expected


def test_statistics_of_partitions_given_away_are_removed() -> None:
    meter = LagFromStatistics("g-removal")

    def stats(**partitions: dict[str, object]) -> str:
        return json.dumps({"topics": {"t": {"partitions": {"-1": {"consumer_lag": -1}, **partitions}}}})

    meter(
        stats(**{"0": {"fetch_state": "active", "consumer_lag": 4}, "1": {"fetch_state": "active", "consumer_lag": 0}})
    )
    assert lags("g-removal", "t") == {0: 4, 1: 0}
    # Partition 1 revoked (no longer fetched); partition 0 never committed: its end minus its position.
    meter(
        stats(
            **{
                "0": {"fetch_state": "active", "consumer_lag": -1, "hi_offset": 10, "app_offset": 7},
                "1": {"fetch_state": "none", "consumer_lag": -1},
            }
        )
    )
    assert lags("g-removal", "t") == {0: 3}
    meter("not json")  # ignored, nothing changes
    assert lags("g-removal", "t") == {0: 3}
