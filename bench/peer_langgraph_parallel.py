"""The fan-out burst of ``bench/parallel.py`` on LangGraph + PostgresSaver, for the same figures.

Extends the peers' LangGraph workload (``../shared/peers/bench_langgraph.py``, read-only; its embedded
PostgreSQL helpers are imported from there) with the shape of ``workflows/onboarding-parallel.toml``:
enrich, then crm and jira at once, then email and slack at once, each waiting for both (LangGraph's
parallel branches with a join). Its sequential twin chains the same five nodes. Each node waits
``--step-ms`` (asyncio.sleep, as the peers' W2 does) where a streamagent step makes one HTTP call to a
sandbox API with that latency. The checkpointer commits before the next step starts (``durability="sync"``,
the guarantee that matches streamagent's), on a fresh database per workflow.

``--conc`` workers (a closed loop, as the peers' "workers" mode) take the burst's runs one after the other,
so a run waits for a worker before its first node, as a streamagent run waits for a place
(``--max-running-runs``). Every figure is per run, then the median, with bench/parallel.py's names:
``makespan_p50_s`` (first node's start to last node's end), ``longest_branch_s`` (the node durations along
the longest chain), ``sum_of_steps_s``, ``makespan_over_longest_p50`` (each run's own ratio),
``run_duration_p50_s`` (the burst's start to the run's end) and ``burst_wall_s``.

Run it with the peers' venv (``../shared/peers/run.sh WORK w1`` creates it):

    PEERS_WORK=/tmp/peers /tmp/peers/venv/bin/python bench/peer_langgraph_parallel.py --runs 1000 --conc 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TypedDict

PEERS = Path(os.environ.get("PEERS_DIR", Path(__file__).resolve().parents[2] / "shared" / "peers"))
sys.path.insert(0, str(PEERS))

# (node, the nodes it waits for), in an order where each comes after what it needs.
PARALLEL = [
    ("enrich", []),
    ("crm", ["enrich"]),
    ("jira", ["enrich"]),
    ("email", ["crm", "jira"]),
    ("slack", ["crm", "jira"]),
]
SEQUENTIAL = [("enrich", []), ("crm", ["enrich"]), ("jira", ["crm"]), ("email", ["jira"]), ("slack", ["email"])]


class Onboarding(TypedDict, total=False):
    company: str
    thread: str  # the run's thread id, so each node files its times under its run
    enrich: dict
    crm: dict
    jira: dict
    email: dict
    slack: dict


def build(shape: list[tuple[str, list[str]]], step_s: float, times: dict[str, dict[str, tuple[float, float]]]) -> Any:
    from langgraph.graph import END, START, StateGraph

    def node(name: str) -> Any:
        async def run(state: Onboarding) -> dict[str, Any]:
            started = time.monotonic()
            await asyncio.sleep(step_s)
            times.setdefault(state["thread"], {})[name] = (started, time.monotonic())
            return {name: {"company": state["company"], "step": name, "ok": True}}

        return run

    graph = StateGraph(Onboarding)
    for name, _ in shape:
        graph.add_node(name, node(name))
    for name, needs in shape:
        if not needs:
            graph.add_edge(START, name)
        elif len(needs) == 1:
            graph.add_edge(needs[0], name)
        else:
            graph.add_edge(needs, name)  # a join: runs once every branch it names has finished
    waited_for = {n for _, needs in shape for n in needs}
    for name, _ in shape:
        if name not in waited_for:
            graph.add_edge(name, END)
    return graph


def figures(shape: list[tuple[str, list[str]]], times: dict[str, tuple[float, float]]) -> tuple[float, float, float]:
    took = {name: end - start for name, (start, end) in times.items()}
    makespan = max(e for _, e in times.values()) - min(s for s, _ in times.values())
    path: dict[str, float] = {}
    for name, needs in shape:
        path[name] = took[name] + max((path[n] for n in needs), default=0.0)
    return makespan, max(path.values()), sum(took.values())


async def measure(
    name: str, shape: list[tuple[str, list[str]]], db: str, runs: int, conc: int, step_s: float
) -> dict[str, Any]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    size = conc + 8
    pool = AsyncConnectionPool(
        db,
        min_size=size,
        max_size=size,
        open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )
    await pool.open(wait=True)
    saver = AsyncPostgresSaver(pool)
    await saver.setup()
    times: dict[str, dict[str, tuple[float, float]]] = {}
    app = build(shape, step_s, times).compile(checkpointer=saver)
    last = shape[-1][0]

    async def one(i: int, prefix: str) -> str:
        thread = f"{prefix}-{i}-{uuid.uuid4().hex[:8]}"
        config = {"configurable": {"thread_id": thread}}
        out = await app.ainvoke({"company": f"acme{i}", "thread": thread}, config, durability="sync")
        assert out[last]["ok"], out
        return thread

    async def burst(count: int, prefix: str) -> list[str]:
        todo = iter(range(count))
        done: list[str] = []

        async def worker() -> None:
            for i in todo:  # a shared iterator: each run is taken once, by the first free worker
                done.append(await one(i, prefix))

        await asyncio.gather(*[worker() for _ in range(conc)])
        return done

    await burst(20, "warm")
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    threads = await burst(runs, "run")
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    await pool.close()
    per_run = [figures(shape, times[t]) for t in threads]
    ends = [max(e for _, e in times[t].values()) - started for t in threads]

    def p50(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    return {
        "peer": "langgraph",
        "workflow": name,
        "conc": conc,
        "runs": runs,
        "completed": len(threads),
        "makespan_p50_s": p50([f[0] for f in per_run]),
        "longest_branch_s": p50([f[1] for f in per_run]),
        "sum_of_steps_s": p50([f[2] for f in per_run]),
        "makespan_over_longest_p50": p50([f[0] / f[1] for f in per_run]),
        "run_duration_p50_s": p50(ends),
        "burst_wall_s": round(wall, 2),
        # The driver's own CPU (PostgreSQL's is not counted here).
        "client_cpu_ms_per_run": round(
            ((after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)) * 1000 / runs, 2
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs of each workflow in one burst (1000)")
    parser.add_argument("--conc", type=int, default=32, help="workers: runs in flight at once (32)")
    parser.add_argument("--step-ms", type=int, default=200, help="each node's wait, as an API call (200)")
    args = parser.parse_args()
    import pgutil  # the peers' embedded PostgreSQL helpers

    server = pgutil.start_server()
    admin = server.get_uri()
    results = []
    try:
        for name, shape in (("parallel", PARALLEL), ("sequential", SEQUENTIAL)):
            db = pgutil.fresh_db(admin, f"lg_fanout_{name}")
            results.append(asyncio.run(measure(name, shape, db, args.runs, args.conc, args.step_ms / 1000)))
            pgutil.drop_db(admin, f"lg_fanout_{name}")
    finally:
        pgutil.stop_server()
    print(
        f"{'workflow':<12} {'conc':>5} {'makespan p50':>13} {'longest path':>13} {'ratio':>6}"
        f" {'request to end':>15} {'wall':>7}"
    )
    for r in results:
        print(
            f"{r['workflow']:<12} {r['conc']:>5} {r['makespan_p50_s']:>12}s {r['longest_branch_s']:>12}s"
            f" {r['makespan_over_longest_p50']:>6} {r['run_duration_p50_s']:>14}s {r['burst_wall_s']:>6}s"
        )
    for r in results:
        print(json.dumps(r))
    return 0 if all(r["completed"] == r["runs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
