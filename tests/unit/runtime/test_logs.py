"""Structured logs: a Kafka client's retry lines, repeated while a broker is down, are collapsed."""

from __future__ import annotations

import logging

from streamagent.logs import RepeatFilter


def _record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_alike_client_lines_pass_once_per_window_with_how_many_were_dropped() -> None:
    now = [0.0]
    repeats = RepeatFilter(window_s=30.0, clock=lambda: now[0])
    refused = "FAIL [rdkafka#consumer-3] 127.0.0.1:8471/bootstrap: Connect failed: Connection refused (after {}ms)"

    shown = []
    for i in range(600):  # 30 s of librdkafka retrying every 50 ms
        now[0] = i * 0.05
        record = _record("librdkafka", refused.format(i % 3))
        if repeats.filter(record):
            shown.append(record)
    now[0] = 30.0
    last = _record("librdkafka", refused.format(0))

    assert len(shown) == 1 and not hasattr(shown[0], "repeated")
    assert repeats.filter(last) and last.repeated == 599  # the next one says how many it stands for
    other = _record("librdkafka", "FAIL [rdkafka#producer-1] GroupCoordinator: Disconnected")
    assert repeats.filter(other)  # another kind of line has its own count


def test_our_own_lines_are_never_collapsed() -> None:
    repeats = RepeatFilter(clock=lambda: 0.0)
    assert all(repeats.filter(_record("streamagent.tools.sdk.runner", "started tool-slack")) for _ in range(5))
