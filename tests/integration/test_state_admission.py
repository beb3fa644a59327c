"""The bound on running runs holds per stack with two state members.

Admission counts per partition (``ceil(max_running_runs / partitions)`` each); a partition has one
owner at a time, so two members together never run more than the stack's bound. Each member's
``streamagent_runs_admitted`` gauge counts the runs in flight on its partitions: their sum is polled
while a burst goes through, with a slow API so that most runs wait.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import ended, eventually
from streamagent.tools.sandbox import FaultSpec, SandboxClient

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Child, Stack, cli_argv
from streamagent.metrics import scrape
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

BOUND = 4  # with 4 partitions: one run in flight per partition


def _port(log: Path) -> int | None:
    """The metrics port a process logged at start (both members share a name, so not the port file)."""
    for line in log.read_text(errors="replace").splitlines():
        if '"metrics endpoint up"' in line:
            return int(json.loads(line)["metrics_port"])
    return None


def test_two_state_members_keep_the_stack_bound_on_running_runs(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_running_runs": BOUND})
    with Stack(settings) as stack:
        s = stack.settings
        first = stack.children["processor-state"]
        second = Child(
            "processor-state-2",
            cli_argv("processor", "state"),
            dict(first.env),
            first.log_path.with_name("processor-state-2.log"),
        )
        with stack._lock:
            stack._add(second)
            second.start()
        ports = [eventually(lambda c=c: _port(c.log_path), timeout=60, what="metrics port") for c in (first, second)]
        SandboxClient(s.sandbox_url).set_faults("jira", FaultSpec(latency_ms=300))
        run_ids = produce_requests(s, sample_requests(24))
        peak, seen = 0, Counter()

        def admitted() -> list[float]:
            return [scrape(port, "streamagent_runs_admitted") or 0.0 for port in ports]

        def done() -> bool:
            nonlocal peak
            counts = admitted()
            peak = max(peak, int(sum(counts)))
            for i, n in enumerate(counts):
                seen[i] = max(seen[i], int(n))
            return ended(s, run_ids) is not None

        eventually(done, timeout=240, interval=0.05, what="24 runs ended")
        rows = ended(s, run_ids)
        assert rows is not None and Counter(r.status for r in rows) == {"completed": 24}
        print(f"\n[admission] two state members, bound {BOUND}: peak in flight {peak}, per member {dict(seen)}")
        assert peak <= BOUND, f"{peak} runs in flight across two members; the stack's bound is {BOUND}"
        assert all(seen[i] > 0 for i in range(2)), f"a member ran nothing: {dict(seen)}"
