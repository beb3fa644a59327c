"""The records faust skipped are read back from the real broker, exactly the asked ranges, in offset order."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer
from streamagent.processors.state.offsets import FoldOffsets, read_range

from streamagent.config import Settings
from streamagent.kafka import create_topics
from streamagent.topics import RUN_EVENTS, TOOL_RESULTS

pytestmark = pytest.mark.integration


def test_skipped_ranges_are_read_from_the_broker_and_then_fold_in_order(settings: Settings) -> None:
    create_topics(settings)
    events, results = settings.topic(RUN_EVENTS), settings.topic(TOOL_RESULTS)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i in range(10):
        producer.produce(
            events, key=f"run-{i}".encode(), value=f"e{i}".encode(), partition=1, headers=[("n", str(i).encode())]
        )
        producer.produce(results, value=f"r{i}".encode(), partition=3)
    assert producer.flush(30) == 0

    got = read_range(settings, {(events, 1): (3, 7), (results, 3): (0, 2)})
    assert sorted((r.topic, r.offset, r.value) for r in got) == [
        (events, 3, b"e3"),
        (events, 4, b"e4"),
        (events, 5, b"e5"),
        (events, 6, b"e6"),
        (results, 0, b"r0"),
        (results, 1, b"r1"),
    ]
    fifth = next(r for r in got if r.offset == 5 and r.topic == events)
    # Key and headers too: a record read back that cannot be folded is dead-lettered under its key.
    assert fifth.headers == [("n", b"5")] and fifth.key == b"run-5"
    assert next(r for r in got if r.topic == results).key is None

    # The fold had taken events[1] up to 3 when faust delivered 7 and 8: the hole is 3..6, and once it is
    # filled the fold takes 3..8 in order.
    offsets = FoldOffsets({(events, 1): 3})
    delivered = read_range(settings, {(events, 1): (7, 9)})
    holes = offsets.holes(delivered, lambda tp: None)
    assert holes == {(events, 1): (3, 7)}
    filled = read_range(settings, holes)
    taken = offsets.take(sorted([*filled, *delivered], key=lambda r: r.offset), lambda tp: None)
    assert [r.offset for r in taken] == [3, 4, 5, 6, 7, 8]


def test_a_range_beyond_the_end_of_the_log_is_an_error_that_names_it(settings: Settings) -> None:
    create_topics(settings)
    events = settings.topic(RUN_EVENTS)
    with pytest.raises(TimeoutError, match=rf"{events}\[0\] before 5"):
        read_range(settings, {(events, 0): (0, 5)}, timeout_s=2)
