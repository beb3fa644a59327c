"""The broker-free parts of ``streamagent replay``: fold order, run-disjoint batches, the decision diff."""

from __future__ import annotations

import io

from streamagent.processors.decision.decider import Decision

from streamagent.console.replay.decisions import compare
from streamagent.console.replay.progress import ProgressLine
from streamagent.console.replay.rebuild import run_disjoint
from streamagent.console.replay.source import fold_order
from streamagent.events import DecisionAction, DecisionRecorded


class Msg:
    """The parts of a confluent ``Message`` the replay reads."""

    def __init__(self, topic: str, partition: int, offset: int, ts: int, key: bytes = b"r") -> None:
        self._t, self._p, self._o, self._ts, self._k = topic, partition, offset, ts, key

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)

    def key(self) -> bytes:
        return self._k


def test_fold_order_merges_the_two_topics_of_a_partition_by_timestamp() -> None:
    events = [Msg("events", 0, 0, 10), Msg("events", 0, 1, 30), Msg("events", 1, 0, 5)]
    results = [Msg("results", 0, 0, 20), Msg("results", 1, 0, 1)]
    ordered = fold_order(events + results)  # type: ignore[arg-type]
    got = [(m.topic(), m.partition(), m.offset()) for m in ordered]
    assert got == [("events", 0, 0), ("results", 0, 0), ("events", 0, 1), ("results", 1, 0), ("events", 1, 0)]


def test_run_disjoint_batches_never_hold_a_run_twice() -> None:
    keys = [b"a", b"b", b"a", b"c", b"c", b"d"]
    msgs = [Msg("events", 0, i, i, k) for i, k in enumerate(keys)]
    batches = [[m.key() for m in b] for b in run_disjoint(msgs, size=10)]  # type: ignore[arg-type]
    assert batches == [[b"a", b"b"], [b"a", b"c"], [b"c", b"d"]]
    assert [len(b) for b in run_disjoint(msgs, size=2)] == [2, 2, 2]  # type: ignore[arg-type]


def _recorded(action: DecisionAction, step: str | None = "email", args: dict | None = None) -> DecisionRecorded:
    return DecisionRecorded(
        run_id="r",
        decision_id="d",
        based_on_version=3,
        action=action,
        step=step,
        tool=step,
        arguments=args or {},
        reason="x",
        decider="rules",
    )


def test_the_decision_diff_names_what_differs_first_the_outcome_then_the_tool_then_the_arguments() -> None:
    recorded = _recorded(DecisionAction.dispatch, "email", {"subject": "a"})
    same = Decision(DecisionAction.dispatch, "r", step="email", tool="email", arguments={"subject": "a"})
    assert compare(recorded, same) == "same"
    assert compare(recorded, Decision(DecisionAction.dispatch, "r", "email", "email", {"subject": "b"})) == (
        "different arguments"
    )
    assert compare(recorded, Decision(DecisionAction.dispatch, "r", "slack", "slack", {})) == "different tool"
    assert compare(recorded, Decision(DecisionAction.escalate, "r")) == "different outcome"
    assert compare(recorded, None) == "different outcome"


def test_progress_says_events_rate_and_eta() -> None:
    out = io.StringIO()
    line = ProgressLine(out, every_s=0)
    line("fold", 0, 1000)
    line.started -= 1.0  # a second into the phase
    line("fold", 500, 1000)
    line("fold", 1000, 1000)
    text = out.getvalue()
    assert "fold      500/1,000 events" in text and "events/s, ETA" in text and "1,000/1,000 events" in text
