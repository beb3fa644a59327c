"""Scale-out benchmark (issue 21): 1 and 2 members per consumer group, and what a rebalance costs.

For each setting of ``--members`` it starts an embedded stack with that many members in every group
(``STREAMAGENT_STACK_MEMBERS``), completes one warm-up run, and then:

1. a clean burst of ``--runs`` runs: runs/s and the stack's CPU per run (from /proc, as bench/load.py),
   with no member joining or leaving;
2. churn under a steady load (``--churn-load`` times the clean burst's runs/s, so queues stay short and
   a pause is the rebalance's, not a backlog's), during which a member joins every group, then one
   member of every group leaves (SIGTERM), then a state, a decision and a tool (jira) member are killed
   with kill -9 (the supervisor starts each again), ``--settle-s`` apart. Every group's committed
   offsets and every run-path partition's end are sampled (``--sample-s``). The pause of each event,
   per (group, partition), is the longest stretch from the event to the next one during which work
   waited (the partition's end lay beyond the group's commit) and the commit did not advance;
   ``*_pause_p99_s`` is the p99 of those over every group's run-path partitions. ``*_gap_p99_s`` is
   the older, coarser figure: the longest stretch without a commit advance, work waiting or not, so
   it also counts a group starved by the one before it (a decision member idle because the state
   group is rebalancing).

Both bursts count duplicate effects (a (run, api) the sandbox performed more than once). Per setting it
prints a human table and then one line of pure JSON:

    .venv/bin/python bench/scale.py                          # 1 and 2 members, 2,000-run bursts
    .venv/bin/python bench/scale.py --members 2 --runs 200   # a quick check

Exit status 0 when every run of every burst completed with no duplicate effect, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import psycopg
from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition
from streamagent.tools.sandbox.client import SandboxClient

from streamagent.config import Settings, get_settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.kafka import admin, client_config, group_offsets
from streamagent.members import read_members
from streamagent.submit import produce_requests
from streamagent.topics import COMMANDS_PREFIX, RUN_EVENTS, RUN_REQUESTS, RUN_STATE, TOOL_RESULTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import CpuMeter, positive_ints  # sibling scripts, not a package
from run_throughput import in_data_dir, percentile, warm_up

APIS = ("enrich", "jira", "email", "slack")
GROUPS = ["intake", "memory", "state", "decision", "projection", *(f"tool.{a}" for a in APIS)]
BASES = {
    "intake": "processor-intake",
    "memory": "processor-memory",
    "state": "processor-state",
    "decision": "processor-decision",
    "projection": "processor-projection",
    **{f"tool.{a}": f"tool-{a}" for a in APIS},
}
KILLED = ("state", "decision", "tool.jira")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Members per group: runs/s, CPU per run, rebalance pauses.")
    parser.add_argument("--members", type=positive_ints, default=[1, 2], help="members per group to run (1,2)")
    parser.add_argument("--runs", type=int, default=2000, help="runs per burst (default 2000)")
    parser.add_argument("--timeout", type=float, help="seconds a burst may take (default 120 + 0.5 s per run)")
    parser.add_argument("--sample-s", type=float, default=0.25, help="how often committed offsets are read")
    parser.add_argument("--settle-s", type=float, default=20.0, help="seconds between churn events (default 20)")
    parser.add_argument(
        "--churn-load", type=float, default=0.6, help="churn request rate, a share of the clean burst's runs/s"
    )
    parser.add_argument("--data-dir", type=Path, help="new or empty dir for the stacks' files; default: temp")
    parser.add_argument(
        "--no-churn", action="store_true", help="the clean burst only (runs/s and CPU per run, by process)"
    )
    args = parser.parse_args(argv)
    if args.runs <= 0:
        parser.error("--runs must be positive")
    return args


def run_path(topic: str, prefix: str) -> bool:
    name = topic.removeprefix(prefix)
    return name in (RUN_REQUESTS, RUN_EVENTS, TOOL_RESULTS, RUN_STATE) or name.startswith(COMMANDS_PREFIX)


class Ends:
    """The end of every run-path partition, as carried in fetch responses (ListOffsets is wrong on the
    embedded broker, BROKER-NOTES): a consumer of no group follows each partition's tail."""

    def __init__(self, settings: Settings, partitions: Iterable[tuple[str, int]]) -> None:
        self.consumer = Consumer(
            {
                **client_config(settings),
                "group.id": f"{settings.topic_prefix}bench-scale-ends",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 100,
            }
        )
        self.partitions = sorted(set(partitions))
        self.consumer.assign([TopicPartition(t, p, OFFSET_END) for t, p in self.partitions])

    def read(self) -> dict[tuple[str, int], int]:
        while self.consumer.consume(num_messages=10_000, timeout=0):
            pass  # drained: the fetcher keeps the watermarks of the latest fetch response
        out = {}
        for topic, partition in self.partitions:
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            if high >= 0:
                out[(topic, partition)] = high
        return out

    def close(self) -> None:
        self.consumer.close()


class Progress:
    """Each group's committed offset of each run-path partition, and that partition's end, sampled."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = admin(settings)
        self.partitions: dict[str, list[tuple[str, int]]] = {}
        # (group, topic, partition) -> samples of (time, committed offset, partition end or None)
        self.samples: dict[tuple[str, str, int], list[tuple[float, int, int | None]]] = {}
        self.ends: Ends | None = None

    def learn(self) -> None:
        """Which partitions each group reads, from its members' announcements."""
        for m in read_members(self.settings).values():
            parts = {(p.topic, p.partition) for p in m.partitions if run_path(p.topic, self.settings.topic_prefix)}
            self.partitions[m.group] = sorted(set(self.partitions.get(m.group, [])) | parts)
        if self.ends is not None:
            self.ends.close()
        self.ends = Ends(self.settings, [tp for parts in self.partitions.values() for tp in parts])

    def sample(self) -> None:
        now = time.monotonic()
        ends = self.ends.read() if self.ends is not None else {}
        for group, parts in self.partitions.items():
            if not parts:
                continue
            try:
                offsets = group_offsets(self.client, self.settings.group(group), parts, timeout_s=5)
            except KafkaException:  # the coordinator busy with a rebalance: the next sample says it
                continue
            for (topic, partition), offset in offsets.items():
                self.samples.setdefault((group, topic, partition), []).append(
                    (now, offset, ends.get((topic, partition)))
                )

    def pauses(self, start: float, end: float, groups: Iterable[str] | None = None) -> list[float]:
        """Per (group, partition) with work in the window: the longest stretch between ``start`` and
        ``end`` during which work waited and the commit did not advance."""
        wanted = set(groups) if groups is not None else None
        out = []
        for (group, _topic, _p), samples in self.samples.items():
            if wanted is not None and group not in wanted:
                continue
            longest, worked = stall(samples, start, end)
            if worked:
                out.append(longest)
        return out

    def gaps(self, start: float, end: float, groups: Iterable[str] | None = None) -> list[float]:
        """Per (group, partition) that advanced after ``start``: the longest stretch without an advance
        from ``start`` until ``end`` (or its last advance before ``end``), work waiting or not."""
        wanted = set(groups) if groups is not None else None
        out = []
        for (group, _topic, _p), samples in self.samples.items():
            if wanted is not None and group not in wanted:
                continue
            times = [t for (_, prev, _e), (t, o, _) in pairwise(samples) if o > prev]  # the advances
            after = [t for t in times if start < t <= end]
            if not after:
                continue  # no work on this partition in the window: no pause to speak of
            before = [t for t in times if t <= start]
            edges = [max(before[-1], start) if before else start, *after]
            out.append(max(b - a for a, b in pairwise(edges)))
        return out


def stall(samples: Sequence[tuple[float, int, int | None]], start: float, end: float) -> tuple[float, bool]:
    """The longest stretch in ``[start, end]`` with work waiting (end of the partition beyond the commit)
    and no commit advance, and whether work waited at all. A stretch ends when the commit advances (a
    new one starts there if work still waits) or when nothing is left to do."""
    longest, worked = 0.0, False
    since: float | None = None
    previous: int | None = None
    last = start
    for t, committed, top in samples:
        if t > end:
            break
        if t >= start:
            last = t
            if since is not None and previous is not None and committed > previous:
                longest, since = max(longest, t - since), None
            if top is not None and committed < top:
                worked = True
                since = t if since is None else since
            elif since is not None:
                longest, since = max(longest, t - since), None
        previous = committed
    if since is not None:
        longest = max(longest, last - since)
    return longest, worked


def ended(conn: psycopg.Connection, run_ids: list[str]) -> Counter[str]:
    rows = conn.execute("SELECT status FROM runs WHERE run_id = ANY(%s)", (run_ids,)).fetchall()
    return Counter(str(status) for (status,) in rows)


def wait(
    settings: Settings, run_ids: list[str], timeout_s: float, on_tick: Iterable[object] = ()
) -> tuple[Counter[str], float]:
    began = time.monotonic()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        while True:
            counts = ended(conn, run_ids)
            done = sum(n for status, n in counts.items() if status != "running")
            if done == len(run_ids) or time.monotonic() - began > timeout_s:
                return counts, time.monotonic() - began
            for tick in on_tick:
                tick()  # type: ignore[operator]
            time.sleep(0.25)  # the poll interval of a deadline-bounded wait


def duplicates(settings: Settings, run_ids: list[str]) -> int:
    wanted = set(run_ids)
    with SandboxClient(settings.sandbox_url) as sandbox:
        per = Counter((e.run_id, e.api) for e in sandbox.effects() if e.run_id in wanted)
    return sum(n - 1 for n in per.values() if n > 1)


class SteadyLoad:
    """Requests at a steady rate from a background thread, so every churn event happens under load."""

    def __init__(self, settings: Settings, rate: float) -> None:
        self.settings, self.rate = settings, rate
        self.run_ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _produce(self) -> None:
        started, sent = time.monotonic(), 0
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * self.rate) - sent
            if due > 0:
                self.run_ids += produce_requests(
                    self.settings, sample_requests(due, requested_by=f"bench-churn-{sent}")
                )
                sent += due
            self._stop.wait(0.1)  # a tenth of a second's requests per send


def churn(stack: Stack, members: int, rate: float, args: argparse.Namespace) -> dict[str, object]:
    s = stack.settings
    progress = Progress(s)
    progress.learn()
    load = SteadyLoad(s, rate)
    load.start()
    marks: dict[str, float] = {}

    def hold(seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            progress.sample()
            time.sleep(args.sample_s)  # the sampling interval

    hold(args.settle_s / 2)  # the load under way, partitions progressing
    marks["join"] = time.monotonic()
    for group in GROUPS:
        stack.add_member(BASES[group])
    hold(args.settle_s)
    progress.learn()
    marks["leave"] = time.monotonic()
    for group in GROUPS:
        stack.undeploy(f"{BASES[group]}-{members + 1}", signal.SIGTERM)
    hold(args.settle_s)
    marks["kill"] = time.monotonic()
    for group in KILLED:
        stack.kill(BASES[group] if members == 1 else f"{BASES[group]}-2")
    hold(args.settle_s)
    load.stop()
    run_ids = load.run_ids
    deadline = time.monotonic() + (args.timeout or 120 + 0.5 * len(run_ids))
    counts, _ = wait(s, run_ids, max(1.0, deadline - time.monotonic()), on_tick=[progress.sample])
    hold(1.0)
    end = marks["kill"] + args.settle_s
    if progress.ends is not None:
        progress.ends.close()
    windows = {"join": (marks["join"], marks["leave"], None), "leave": (marks["leave"], marks["kill"], None)}
    windows["kill"] = (marks["kill"], end, KILLED)
    p99 = lambda xs: round(percentile(xs, 0.99), 2) if xs else None  # noqa: E731
    out: dict[str, object] = {
        "churn_runs": len(run_ids),
        "churn_rate_runs_per_s": round(rate, 1),
        "churn_completed": counts.get("completed", 0),
        "churn_duplicate_effects": duplicates(s, run_ids),
    }
    for event, (a, b, groups) in windows.items():
        pauses, gaps = progress.pauses(a, b, groups), progress.gaps(a, b, groups)
        out[f"{event}_pause_p99_s"] = p99(pauses)
        out[f"{event}_pause_max_s"] = round(max(pauses), 2) if pauses else None
        out[f"{event}_gap_p99_s"] = p99(gaps)
        out[f"{event}_pause_samples"] = len(pauses)
        # Which group pauses longest.
        out[f"{event}_pause_max_by_group"] = by_group(progress.pauses, a, b)
        out[f"{event}_gap_max_by_group"] = by_group(progress.gaps, a, b)
    return out


def by_group(measure: Callable[..., list[float]], start: float, end: float) -> dict[str, float]:
    """The longest pause (or gap) of each group's partitions between ``start`` and ``end``, in seconds."""
    out = {}
    for group in GROUPS:
        found = measure(start, end, [group])
        if found:
            out[group] = round(max(found), 2)
    return out


def setting(members: int, args: argparse.Namespace, data_dir: Path) -> dict[str, object]:
    spec = ",".join(f"{g}={members}" for g in ("intake", "memory", "state", "decision", "projection", "tools"))
    base = get_settings().model_copy(
        update={
            "data_dir": data_dir / f"members-{members}",
            "broker_port": 0,
            "sandbox_port": 0,
            "stack_members": spec,
            "member_report_s": 1.0,
        }
    )
    started = time.monotonic()
    with Stack(base) as stack:
        s = stack.settings
        print(f"\n{members} member(s) per group: stack up in {time.monotonic() - started:.1f} s", flush=True)
        if warm_up(s, 180) is None:
            raise SystemExit("the warm-up run did not end within 180 s")
        run_ids = produce_requests(s, sample_requests(args.runs, requested_by="bench-scale"))
        meter = CpuMeter(stack)
        meter.begin()
        counts, took = wait(s, run_ids, args.timeout or 120 + 0.5 * args.runs, on_tick=[meter.poll])
        meter.end()
        cpu = meter.ms_by_process()
        stack_ms = sum(ms for name, ms in cpu.items() if name != "sandbox")
        result: dict[str, object] = {
            "bench": "scale",
            "members": members,
            "runs": args.runs,
            "completed": counts.get("completed", 0),
            "duplicate_effects": duplicates(s, run_ids),
            "runs_per_s": round(counts.get("completed", 0) / took, 1),
            "cpu_ms_per_run": round(stack_ms / args.runs, 2),
            "partitions": s.partitions,
            "session_timeout_ms": s.session_timeout_ms,
            "load_avg": round(os.getloadavg()[0], 2),
            # By kind of process, its members summed ("processor-state-2" counts as "processor-state"):
            # where a second member's CPU goes.
            "cpu_ms_per_run_by_process": by_kind(cpu, args.runs),
        }
        if args.no_churn:
            return result
        # The churn load: a share of what this setting just carried, so queues stay short and a pause is
        # the rebalance's, not a backlog's.
        result.update(churn(stack, members, args.churn_load * float(result["runs_per_s"]), args))
    return result


def by_kind(cpu: dict[str, float], runs: int) -> dict[str, float]:
    kinds: Counter[str] = Counter()
    for name, ms in cpu.items():
        base, _, index = name.rpartition("-")
        kinds[base if base and index.isdigit() else name] += ms
    return {name: round(ms / runs, 2) for name, ms in sorted(kinds.items(), key=lambda kv: -kv[1])}


def print_table(result: dict[str, object]) -> None:
    print(f"members per group: {result['members']}")
    for key in (
        "runs",
        "completed",
        "duplicate_effects",
        "runs_per_s",
        "cpu_ms_per_run",
        "churn_completed",
        "churn_duplicate_effects",
        "join_pause_p99_s",
        "leave_pause_p99_s",
        "kill_pause_p99_s",
        "join_pause_max_s",
        "leave_pause_max_s",
        "kill_pause_max_s",
        "join_gap_p99_s",
        "leave_gap_p99_s",
        "kill_gap_p99_s",
        "load_avg",
    ):
        if key in result:
            print(f"  {key:<28} {result[key]}")
    print(
        "  cpu ms/run by process".ljust(31)
        + ", ".join(f"{k} {v}" for k, v in result["cpu_ms_per_run_by_process"].items())
    )
    for event in ("join", "leave", "kill"):
        for kind in ("pause", "gap"):
            groups = result.get(f"{event}_{kind}_max_by_group") or {}
            print(f"  {event} {kind} max by group".ljust(31) + ", ".join(f"{g} {v}s" for g, v in groups.items()))


def bench(args: argparse.Namespace, data_dir: Path) -> int:
    ok = True
    for members in args.members:
        result = setting(members, args, data_dir)
        print_table(result)
        print(json.dumps(result), flush=True)
        ok = ok and result["completed"] == args.runs and not result["duplicate_effects"]
        if not args.no_churn:
            ok = ok and result["churn_completed"] == result["churn_runs"] and not result["churn_duplicate_effects"]
    print("OK" if ok else "FAILED: a run did not complete, or an effect was repeated")
    return 0 if ok else 1


def main(argv: Iterable[str] | None = None) -> int:
    return in_data_dir(parse_args(list(argv) if argv is not None else None), bench, "streamagent-scale-")


if __name__ == "__main__":
    sys.exit(main())
