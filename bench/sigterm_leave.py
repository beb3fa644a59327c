"""How long each tool takes to leave on SIGTERM in the middle of a burst (issue 21: a slow leave is a
pause on every rebalance of its group).

Starts the embedded stack, slows the sandbox's APIs (jira 300 ms, the others 80 ms, so that calls are in
flight), produces a burst, and every few seconds sends SIGTERM to one tool process, timing until it has
exited; the supervisor restarts it and the burst completes.

    .venv/bin/python bench/sigterm_leave.py --runs 200 --rounds 2

Prints a human table, then one line of pure JSON per stop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from streamagent.processors.projection import queries
from streamagent.tools.sandbox import FaultSpec, SandboxClient

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.submit import produce_requests

TOOLS = ("tool-jira", "tool-enrich", "tool-email", "tool-slack")


def all_ended(settings: Settings, run_ids: list[str]) -> bool:
    wanted = set(run_ids)
    rows = [r for r in queries.runs(settings, limit=100_000) if r.run_id in wanted]
    return len(rows) == len(wanted) and all(r.status not in ("running", "waiting") for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="SIGTERMs of each tool")
    parser.add_argument("--every-s", type=float, default=3.0, help="seconds between two stops")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="sigterm-leave-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", partitions=4, broker_port=0, sandbox_port=0)
        with Stack(settings) as stack:
            s = stack.settings
            sandbox = SandboxClient(s.sandbox_url)
            for api in ("enrich", "jira", "email", "slack"):
                sandbox.set_faults(api, FaultSpec(latency_ms=300 if api == "jira" else 80))
            run_ids = produce_requests(s, sample_requests(args.runs))
            for name in [tool for _ in range(args.rounds) for tool in TOOLS]:
                time.sleep(args.every_s)
                proc = stack.children[name].proc
                assert proc is not None
                began = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(60)
                results.append(
                    {
                        "bench": "sigterm_leave",
                        "process": name,
                        "exit_code": code,
                        "leave_s": round(time.monotonic() - began, 3),
                        "load_1m": round(os.getloadavg()[0], 1),
                    }
                )
            deadline = time.monotonic() + 600
            while not all_ended(s, run_ids) and time.monotonic() < deadline:
                time.sleep(1)
            completed = all_ended(s, run_ids)
    print(f"{'process':14} {'exit':>5} {'leave s':>8} {'load':>5}")
    for r in results:
        print(f"{r['process']:14} {r['exit_code']:>5} {r['leave_s']:>8} {r['load_1m']:>5}")
    print(f"burst of {args.runs} runs {'completed' if completed else 'NOT completed in 600 s'}")
    for r in results:
        print(json.dumps(r))
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main())
