"""Fan-out against its sequential twin: a burst of runs of ``onboarding-parallel`` (crm with jira, then email
with slack, ``max_parallel = 2``) and of the same workflow with ``max_parallel = 1`` (one step at a time).

Starts the embedded stack with every tool the workflow uses, sets the same latency on every sandbox API,
completes one warm-up run of each workflow, then submits ``--runs`` runs of one workflow in one burst,
waits for them, and does the same for the other. Every figure comes from the PostgreSQL projection (event
times, ms precision):

- ``makespan_p50_s``: per run, from its first step's dispatch (the DecisionRecorded that started it) to its
  last step's result, the median over the runs;
- ``longest_branch_s``: per run, the longest path through the workflow's steps (by ``needs``), each step
  counted dispatch to result, the median over the runs: what the makespan would be with no time between
  steps;
- ``sum_of_steps_s``: per run, every step's dispatch-to-result time added up, the median: what a run of
  one step at a time takes at least;
- ``run_duration_p50_s``: request to end, queueing included (a burst queues).

``--max-running-runs N`` bounds the runs in flight (``STREAMAGENT_MAX_RUNNING_RUNS``, default 1000): the
rest of the burst waits for a place before its first step, as the peers' runs wait for one of their 8 or
32 workers, so the wait moves from between a run's steps to before its first one.

A human table, then one JSON line per workflow:

    .venv/bin/python bench/parallel.py --runs 1000 --latency-ms 200
    .venv/bin/python bench/parallel.py --runs 1000 --latency-ms 200 --max-running-runs 100
    .venv/bin/python bench/parallel.py --runs 20                        # a small proof that it runs

Exit status 0 when every run of both workflows completed, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import psycopg
from streamagent.processors.workflow import Workflow, load_workflow
from streamagent.tools.sandbox.apis import API_NAMES
from streamagent.tools.sandbox.client import SandboxClient
from streamagent.tools.sandbox.faults import FaultSpec

from streamagent.config import DEFAULT_WORKFLOWS_DIR, Settings
from streamagent.console.demo import sample_requests, wait_for_runs
from streamagent.console.devstack.stack import Stack
from streamagent.submit import produce_requests

PARALLEL = "onboarding-parallel"
SEQUENTIAL = "onboarding-parallel-sequential"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fan-out against its sequential twin, a burst of runs each.")
    parser.add_argument("--runs", type=int, default=1000, help="runs of each workflow, submitted at once (1000)")
    parser.add_argument("--latency-ms", type=int, default=200, help="latency of every sandbox API call (200)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each burst (900)")
    parser.add_argument(
        "--max-running-runs",
        type=int,
        help="STREAMAGENT_MAX_RUNNING_RUNS for the stack: runs in flight at once, the rest wait their turn"
        " before their first step (default: the setting's, 1000)",
    )
    parser.add_argument("--data-dir", type=Path, help="new or empty dir that keeps the stack's files; default temp")
    return parser.parse_args(argv)


def workflows_dir(into: Path) -> tuple[Workflow, Workflow]:
    """The repository's workflows, plus the parallel one's sequential twin (same steps, one at a time)."""
    for path in DEFAULT_WORKFLOWS_DIR.glob("*.toml"):
        shutil.copy(path, into / path.name)
    text = (DEFAULT_WORKFLOWS_DIR / f"{PARALLEL}.toml").read_text()
    twin = re.sub(r'^name = ".*"$', f'name = "{SEQUENTIAL}"', text, count=1, flags=re.M)
    twin = re.sub(r"^max_parallel = \d+$", "max_parallel = 1", twin, count=1, flags=re.M)
    (into / f"{SEQUENTIAL}.toml").write_text(twin)
    return load_workflow(into / f"{PARALLEL}.toml"), load_workflow(into / f"{SEQUENTIAL}.toml")


def submit(settings: Settings, workflow: str, count: int, tag: str) -> list[str]:
    requests = [r.model_copy(update={"workflow": workflow}) for r in sample_requests(count, requested_by=tag)]
    return produce_requests(settings, requests)


def step_times(settings: Settings, run_ids: list[str]) -> dict[str, dict[str, tuple[datetime, datetime]]]:
    """Per run, each executed step's (dispatched, result) times."""
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT run_id, type, occurred_at, payload FROM run_events WHERE run_id = ANY(%s)"
            " AND type IN ('DecisionRecorded', 'ToolResult') ORDER BY occurred_at",
            (run_ids,),
        ).fetchall()
    started: dict[str, dict[str, datetime]] = {}
    finished: dict[str, dict[str, datetime]] = {}
    for run_id, kind, at, payload in rows:
        if kind == "DecisionRecorded" and payload["action"] == "dispatch":
            for step in [payload["step"], *(p["step"] for p in payload.get("parallel") or [])]:
                started.setdefault(run_id, {}).setdefault(step, at)
        elif kind == "ToolResult" and payload["operation"] == "execute" and payload["status"] == "succeeded":
            finished.setdefault(run_id, {}).setdefault(payload["step"], at)
    return {
        run_id: {s: (started[run_id][s], at) for s, at in steps.items() if s in started.get(run_id, {})}
        for run_id, steps in finished.items()
    }


def run_figures(workflow: Workflow, times: dict[str, tuple[datetime, datetime]]) -> tuple[float, float, float]:
    """(makespan, longest path, sum of steps) of one run, in seconds."""
    took = {s: (end - start).total_seconds() for s, (start, end) in times.items()}
    makespan = (max(e for _, e in times.values()) - min(s for s, _ in times.values())).total_seconds()
    path: dict[str, float] = {}
    for step in workflow.steps:  # declared after what they need, so one pass is in order
        path[step.name] = took.get(step.name, 0.0) + max((path[n] for n in step.needs), default=0.0)
    return makespan, max(path.values()), sum(took.values())


def measure(settings: Settings, workflow: Workflow, count: int, timeout: float) -> dict[str, object]:
    started = time.monotonic()
    run_ids = submit(settings, workflow.name, count, "bench-parallel")
    rows = wait_for_runs(settings, run_ids, timeout, progress=True)
    wall = time.monotonic() - started
    completed = [r for r in rows if r.status == "completed"]
    per_run = step_times(settings, [r.run_id for r in completed])
    figures = [run_figures(workflow, per_run[r.run_id]) for r in completed if r.run_id in per_run]
    durations = [d for r in completed if (d := r.duration_s) is not None]

    def p50(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    return {
        "workflow": workflow.name,
        "max_parallel": workflow.max_parallel,
        "runs": count,
        "completed": len(completed),
        "makespan_p50_s": p50([f[0] for f in figures]),
        "longest_branch_s": p50([f[1] for f in figures]),
        "sum_of_steps_s": p50([f[2] for f in figures]),
        "makespan_over_longest_p50": p50([f[0] / f[1] for f in figures if f[1] > 0]),
        "run_duration_p50_s": p50(durations),
        "burst_wall_s": round(wall, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    temp = None if args.data_dir else tempfile.mkdtemp(prefix="bench-parallel-")
    data_dir = args.data_dir or Path(temp or ".")
    try:
        flows = data_dir / "workflows"
        flows.mkdir(parents=True, exist_ok=True)
        parallel, sequential = workflows_dir(flows)
        tools = ",".join(dict.fromkeys(s.tool for s in parallel.steps))
        bound = {} if args.max_running_runs is None else {"max_running_runs": args.max_running_runs}
        settings = Settings(
            data_dir=data_dir / "stack", workflows_dir=flows, stack_tools=tools, broker_port=0, sandbox_port=0, **bound
        )
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"machine: nproc {len(os.sched_getaffinity(0))}, python {platform.python_version()}, load {load}")
        print(
            f"runs per workflow {args.runs}, latency {args.latency_ms} ms on every API, tools {tools},"
            f" max running runs {settings.max_running_runs}"
        )
        with Stack(settings) as stack:
            s = stack.settings
            with SandboxClient(s.sandbox_url) as sandbox:
                for api in API_NAMES:
                    sandbox.set_faults(api, FaultSpec(latency_ms=args.latency_ms))
            for workflow in (parallel, sequential):  # one warm-up run each: groups joined, connections open
                warm = submit(s, workflow.name, 1, "bench-warmup")
                if not all(r.status == "completed" for r in wait_for_runs(s, warm, 180)):
                    print(f"warm-up run of {workflow.name} did not complete", file=sys.stderr)
                    return 1
            results = [measure(s, workflow, args.runs, args.timeout) for workflow in (parallel, sequential)]
            for r in results:
                r["max_running_runs"] = s.max_running_runs
        print()
        print(f"{'workflow':<32} {'completed':>10} {'makespan p50':>13} {'longest path':>13} {'sum of steps':>13}")
        for r in results:
            print(
                f"{r['workflow']:<32} {r['completed']:>5}/{r['runs']:<4} {r['makespan_p50_s']!s:>12}s"
                f" {r['longest_branch_s']!s:>12}s {r['sum_of_steps_s']!s:>12}s"
            )
        for r in results:
            print(json.dumps(r))
        return 0 if all(r["completed"] == r["runs"] for r in results) else 1
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
