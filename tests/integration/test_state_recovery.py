"""Recovery of the state table is bounded by the runs in flight, not by history.

Ended runs leave the table after ``state_retention_s`` (a tombstone), and a checkpoint of each
partition records its runs and the changelog offset they cover; a state member that starts loads the
checkpoint and reads the changelog after it only. The embedded broker never compacts, so without the
checkpoint every restart would read every changelog record ever written. Real broker, PostgreSQL and
tools; the count of records read comes from the restarted process's own log line.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path

import pytest
from helpers import ended, eventually, read_topic
from streamagent.processors.state.checkpoint import checkpoint_topic, decode
from streamagent.tools.sandbox import FaultSpec, SandboxClient

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.console.replay.verify import changelog_topic
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

RECOVERED = re.compile(r"state recovered: (\d+) run\(s\) from checkpoints, (\d+) changelog record\(s\) read")
BATCH = 40


def _recoveries(log: Path) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in RECOVERED.findall(log.read_text(errors="replace"))]


def _restart_state(stack: Stack) -> tuple[int, int]:
    """SIGTERM the state processor; once its successor owns the partitions, what it recovered."""
    log = stack.children["processor-state"].log_path
    before = len(_recoveries(log))
    stack.kill("processor-state", signal.SIGTERM)
    return eventually(
        lambda: _recoveries(log)[before:] and _recoveries(log)[-1], timeout=90, interval=0.1, what="recovered"
    )


def _settled(s: Settings) -> int:
    """Once every partition's last checkpoint covers its whole changelog and holds no run (every run
    ended and left the table): the number of changelog records (the history); else 0."""
    ends = Counter(m.partition() for m in read_topic(s, changelog_topic(s)))
    last = {m.partition(): decode(m.value()) for m in read_topic(s, checkpoint_topic(s))}
    for p, count in ends.items():
        if p not in last or last[p][0] < count - 1 or last[p][2]:
            return 0
    return sum(ends.values())


def _live_in_checkpoints(s: Settings, live: set[str]) -> int:
    last = {m.partition(): decode(m.value()) for m in read_topic(s, checkpoint_topic(s))}
    return sum(1 for _, _, runs in last.values() for run_id in runs if run_id in live)


def test_a_restarted_state_member_reads_live_runs_not_ended_history(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"state_retention_s": 1.0, "state_checkpoint_interval_s": 0.5, "state_session_timeout_ms": 2000}
    )
    with Stack(settings, restart_backoff_s=0.1) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        history: list[str] = []
        figures = []
        for _ in range(2):
            # A batch of runs that end, then leave the table; the checkpoint then covers their tombstones.
            runs = produce_requests(s, sample_requests(BATCH))
            history += runs
            eventually(lambda r=runs: ended(s, r), timeout=120, what="batch ended")
            records = eventually(lambda: _settled(s), timeout=60, what="ended runs left the table, checkpointed")
            loaded, read = _restart_state(stack)
            figures.append((records, loaded, read))
            # Nothing is live, so nothing is loaded, and only the record each checkpoint ends on is read
            # again (faust starts at the persisted offset): it does not grow with the runs that ended.
            assert loaded == 0, f"ended runs were loaded back: {loaded}"
            assert read <= s.partitions, f"{read} changelog records read at recovery; the history holds {records}"

        # Runs in flight across a restart come back from the checkpoint (and the changelog after it) and end.
        sandbox.set_faults("jira", FaultSpec(latency_ms=400))
        live = produce_requests(s, sample_requests(10))
        eventually(lambda: len({e.run_id for e in sandbox.effects() if e.run_id in set(live)}) >= 5, timeout=60)
        # A checkpoint holding runs in flight exists before the restart: the load path is what is tested.
        eventually(lambda: _live_in_checkpoints(s, set(live)), timeout=60, what="runs in flight checkpointed")
        loaded, read = _restart_state(stack)
        sandbox.set_faults("jira", FaultSpec())
        rows = eventually(lambda: ended(s, live), timeout=120, what="live runs ended after the restart")
        assert Counter(r.status for r in rows) == {"completed": 10}
        assert loaded >= 1, "no run in flight was loaded from a checkpoint"
        per = Counter((e.run_id, e.api) for e in sandbox.effects())
        assert {k: n for k, n in per.items() if n > 1} == {}, "an effect was repeated"
        print(
            "\n[state recovery] (changelog records, runs loaded, records read) after each batch of"
            f" {BATCH} ended runs: {figures}; with runs in flight: loaded {loaded}, read {read}"
        )


def test_a_member_that_keeps_partitions_through_a_rebalance_does_not_read_them_again(settings: Settings) -> None:
    # No checkpoints, so the only thing that bounds this recovery is what the member already holds: every
    # rebalance is eager (each assigned partition is recovered again), and a kept partition used to be read
    # from the start of its changelog (29,188 records in one rebalance of a bench/scale.py run).
    settings = settings.model_copy(update={"state_checkpoint_interval_s": 0.0, "state_session_timeout_ms": 2000})
    with Stack(settings, restart_backoff_s=0.1) as stack:
        s = stack.settings
        history = produce_requests(s, sample_requests(BATCH))
        eventually(lambda: ended(s, history), timeout=120, what="history ended")
        records = len(read_topic(s, changelog_topic(s)))
        log = stack.children["processor-state"].log_path
        before = len(_recoveries(log))
        second = stack.add_member("processor-state")
        _, read = eventually(
            lambda: _recoveries(log)[before:] and _recoveries(log)[-1], timeout=90, interval=0.1, what="rebalanced"
        )
        assert read <= s.partitions, f"the member read {read} changelog records again; the history holds {records}"
        assert records >= BATCH * 4, records  # the bound means something: the history is long

        # Both members carry on: new runs complete, nothing is repeated.
        after = produce_requests(s, sample_requests(20))
        rows = eventually(lambda: ended(s, after), timeout=120, what="runs after the rebalance ended")
        assert Counter(r.status for r in rows) == {"completed": 20}
        assert _recoveries(second.log_path), "the second member never owned partitions"
        per = Counter((e.run_id, e.api) for e in SandboxClient(s.sandbox_url).effects())
        assert {k: n for k, n in per.items() if n > 1} == {}, "an effect was repeated"
        print(f"\n[state recovery] a kept member after a join: read {read} of {records} changelog records")


def test_partitions_that_move_are_handed_off_in_a_checkpoint_not_read_from_the_changelog(settings: Settings) -> None:
    # No periodic checkpoint within the test (an hour apart): whatever a member loads was written when its
    # partitions moved. Without the hand-off, each move read the partitions' whole changelog.
    settings = settings.model_copy(update={"state_checkpoint_interval_s": 3600.0, "state_session_timeout_ms": 2000})
    with Stack(settings, restart_backoff_s=0.1) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        history = produce_requests(s, sample_requests(BATCH))
        eventually(lambda: ended(s, history), timeout=120, what="history ended")
        records = len(read_topic(s, changelog_topic(s)))
        assert records >= BATCH * 4, records  # the bound means something: the history is long

        # A graceful stop (SIGTERM) hands off before the member leaves: its successor loads the runs (the
        # ended ones stay in the table for the retention hour) and reads only each checkpoint's last record.
        first = stack.children["processor-state"].log_path
        loaded, read = _restart_state(stack)
        assert "state handed off (shutdown)" in first.read_text(errors="replace")
        assert loaded >= BATCH and read <= s.partitions, (loaded, read, records)

        # A member joins: the first hands off at the revoke, and the joiner loads its share from there.
        second = stack.add_member("processor-state")
        loaded, read = eventually(
            lambda: _recoveries(second.log_path) and _recoveries(second.log_path)[-1],
            timeout=90,
            interval=0.1,
            what="the joiner recovered",
        )
        assert "state handed off (rebalance)" in first.read_text(errors="replace")
        assert loaded >= 1 and read <= s.partitions, (loaded, read, records)

        # Both members carry on: new runs complete, nothing is repeated.
        live = produce_requests(s, sample_requests(10))
        rows = eventually(lambda: ended(s, live), timeout=120, what="runs after the hand-offs ended")
        assert Counter(r.status for r in rows) == {"completed": 10}
        per = Counter((e.run_id, e.api) for e in sandbox.effects())
        assert {k: n for k, n in per.items() if n > 1} == {}, "an effect was repeated"
        print(f"\n[state hand-off] history {records} changelog records; the joiner loaded {loaded}, read {read}")
