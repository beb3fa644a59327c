"""A checkpoint too big for one record is skipped with a warning; the others are written."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Any

import pytest
from streamagent.processors.state import app as state_app
from streamagent.processors.state.checkpoint import decode

from streamagent.config import Settings


class _Producer:
    def __init__(self) -> None:
        self.produced: list[dict[str, Any]] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.produced.append({"topic": topic, **kwargs})

    def flush(self, timeout: float) -> int:
        return 0


def test_an_oversized_checkpoint_is_skipped_and_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(state_app, "CHECKPOINT_MAX_BYTES", 2_000)
    producer = _Producer()
    worker = SimpleNamespace(
        assigned=frozenset({0, 1}), producer=producer, partition=lambda key: 0 if key.startswith("big") else 1
    )
    store = SimpleNamespace(written={0: (41, "d0"), 1: (17, "d1")})
    checkpoints = state_app.Checkpoints(Settings(), worker, store, "runs-changelog")  # type: ignore[arg-type]
    checkpoints._created = True  # no broker here: the topic is not created
    # Partition 0 holds incompressible runs (far over the limit); partition 1 one small run.
    runs = {f"big-{i}": os.urandom(600).hex().encode() for i in range(10)}
    checkpoints.data = SimpleNamespace(applied={}, data={**runs, "small-1": b'{"snapshot":{}}'})  # type: ignore[assignment]

    with caplog.at_level(logging.WARNING):
        written = checkpoints.write()

    assert written == 1
    assert [p["partition"] for p in producer.produced] == [1]
    offset, _, kept = decode(producer.produced[0]["value"])
    assert offset == 17 and list(kept) == ["small-1"]
    assert "state checkpoint of partition 0 not written" in caplog.text and "(10 runs)" in caplog.text
