"""The state processor restarted again and again under load: no false "command lost", nothing repeated.

A command is declared lost only if its result is not in the log. Every tool here is healthy, so any
``CommandLost`` is a false alarm (each one spends one of the step's re-sends). Real broker, real
PostgreSQL, real tool processes; the APIs are slowed so that runs are mid-flight at every restart.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition
from helpers import ended, eventually, read_topic, why_not_ended
from streamagent.tools.sandbox import FaultSpec, SandboxClient

from streamagent import codec
from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.events import CommandLost, ToolResult
from streamagent.faust_compat import true_highwaters
from streamagent.kafka import admin, group_offsets
from streamagent.submit import produce_requests
from streamagent.topics import RUN_EVENTS, RUN_STATE, TOOL_RESULTS

pytestmark = pytest.mark.integration

APIS = ("enrich", "jira", "email", "slack")
RESTARTS = 10
RUNS_PER_RESTART = 20


class SnapshotClock:
    """When each snapshot was published (its record timestamp), read as they come by a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stamps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> SnapshotClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _read(self) -> None:
        s = self.settings
        c = Consumer(
            {
                "bootstrap.servers": s.bootstrap_servers,
                "group.id": f"{s.topic_prefix}snapshot-clock",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        c.assign([TopicPartition(s.topic(RUN_STATE), p, 0) for p in range(s.partitions)])
        try:
            while not self._stop.is_set():
                msg = c.poll(0.2)
                if msg is not None and not msg.error():
                    self.stamps.append(msg.timestamp()[1] / 1000)
        finally:
            c.close()

    def first_after(self, moment: float) -> float | None:
        return next((t for t in list(self.stamps) if t >= moment), None)


def test_state_processor_restarted_ten_times_under_load_raises_no_false_command_lost(settings: Settings) -> None:
    # Loss checks as eager as they go (one second after dispatch), so a check that judged before the
    # results were folded would fire; each tool works on a few commands at a time so runs stay mid-flight.
    settings = settings.model_copy(
        update={"redrive_check_s": 1.0, "tool_max_in_flight": 4, "state_session_timeout_ms": 2000}
    )
    with Stack(settings, restart_backoff_s=0.1, max_backoff_s=0.5) as stack, SnapshotClock(stack.settings) as clock:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        for api in APIS:
            sandbox.set_faults(api, FaultSpec(latency_ms=150))
        run_ids = produce_requests(s, sample_requests(RUNS_PER_RESTART))
        eventually(lambda: clock.stamps, timeout=120, what="first snapshot")
        leave: list[float] = []
        progress: list[float] = []
        for i in range(RESTARTS):
            sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
            child = stack.children["processor-state"]
            stopping = time.time()
            old = stack.kill("processor-state", sig)
            leave.append(time.time() - stopping)
            eventually(lambda c=child, o=old: c.pid not in (None, o) and c.alive(), timeout=30, interval=0.02)
            started = time.time()
            # Work keeps coming while it is down and starting: runs mid-flight at every restart.
            run_ids += produce_requests(s, sample_requests(RUNS_PER_RESTART))
            first = eventually(lambda t=started: clock.first_after(t), timeout=60, interval=0.05, what="progress")
            progress.append(max(0.0, first - started))
        try:
            rows = eventually(lambda: ended(s, run_ids), timeout=240, what=f"{len(run_ids)} runs ended")
        except AssertionError:
            raise AssertionError(why_not_ended(s, run_ids)) from None
        assert Counter(r.status for r in rows) == {"completed": len(run_ids)}
        per = Counter((e.run_id, e.api) for e in sandbox.effects())
        assert {k: n for k, n in per.items() if n > 1} == {}, "an effect was repeated"
        assert all(per[(r, a)] == 1 for r in run_ids for a in APIS), "an effect is missing"

        answered = {
            e.command_id
            for e in (codec.decode(m.value()) for m in read_topic(s, s.topic(TOOL_RESULTS)))
            if isinstance(e, ToolResult)
        }
        lost = [
            e
            for e in (codec.decode(m.value()) for m in read_topic(s, s.topic(RUN_EVENTS)))
            if isinstance(e, CommandLost)
        ]
        false = [e for e in lost if e.command_id in answered]
        print(
            f"\n[state restarts] {RESTARTS} restarts (SIGTERM/kill -9 alternating), {len(run_ids)} runs completed;"
            f" CommandLost {len(lost)} (false: {len(false)});"
            f" progress after start s: {', '.join(f'{p:.2f}' for p in progress)};"
            f" SIGTERM leave s: {', '.join(f'{t:.2f}' for t in leave[::2])}"
        )
        assert false == [], f"{len(false)} commands declared lost whose results are in the log: {false[:3]}"
        # The group commits what the fold took and settled (processors/state/offsets.py): once every run
        # has ended it reaches the end of the log, so the next start re-reads nothing. (faust's own
        # bookkeeping left it hundreds of offsets behind after a few rebalances.)
        tps = [(t, p) for t in (s.topic(RUN_EVENTS), s.topic(TOOL_RESULTS)) for p in range(s.partitions)]
        ends = true_highwaters(s, tps)
        group = s.group("state")

        def at_the_end() -> bool:
            committed = group_offsets(admin(s), group, tps)
            return all(committed.get(tp, 0) == ends[tp] for tp in tps)

        eventually(at_the_end, timeout=30, what="the state group's commits at the end of the log")
        assert lost == [], f"no command was lost, yet {len(lost)} were declared lost"
        # The target is 5 s from start to progress: 2.4-3.0 s at load 4-6, far more on a saturated
        # machine (docs/operations/state-recovery.md). A timing is a benchmark's to report: this bound only
        # catches a start that hangs; the figures printed above are the result.
        assert max(progress) <= 30.0, f"a restart took {max(progress):.2f}s to publish its first snapshot"
