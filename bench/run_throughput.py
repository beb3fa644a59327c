"""End-to-end throughput of the embedded stack: N onboarding runs submitted at once.

Starts the embedded stack (broker, PostgreSQL, sandbox, 3 processors, 4 tools) in a temporary data
dir, completes one warm-up run so group joins and first connections are not timed, submits ``--runs``
requests in one burst and reads every figure from the PostgreSQL projection, whose timestamps are the
events' own ``occurred_at`` (millisecond precision) rather than this script's polling instants.

    .venv/bin/python bench/run_throughput.py --runs 200 [--faults]

Exit status 0 when every run completed (and, with ``--faults``, no effect was duplicated), else 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, TopicPartition
from streamagent.processors.projection.queries import RunRow
from streamagent.tools.sandbox.apis import API_NAMES
from streamagent.tools.sandbox.client import SandboxClient
from streamagent.tools.sandbox.faults import FaultSpec

from streamagent import db
from streamagent.config import Settings
from streamagent.console.demo import sample_requests, wait_for_runs
from streamagent.console.devstack.stack import Stack
from streamagent.dlq import DeadLetter
from streamagent.submit import produce_requests
from streamagent.topics import DEAD_LETTERS as DLQ_TOPIC
from streamagent.topics import all_topics, physical

FAULTS = FaultSpec(error_rate=0.2, rate_429=0.05, retry_after_s=0.2)


@dataclass(frozen=True)
class EventRow:
    run_id: str
    type: str
    event_id: str
    causation_id: str | None
    occurred_at: datetime
    duration_ms: int | None  # a ToolResult's own timing of the external call(s), retries included


@dataclass(frozen=True)
class TopicFill:
    name: str
    messages: int
    max_per_partition: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="End-to-end throughput of the embedded stack.")
    parser.add_argument("--runs", type=int, default=200, help="onboarding runs submitted at once (default 200)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every run (default 300)")
    parser.add_argument(
        "--partitions", type=int, default=Settings().partitions, help="partitions per topic (default: the setting's)"
    )
    parser.add_argument(
        "--warmup-timeout", type=float, default=120.0, help="seconds the warm-up run may take (default 120)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="new or empty dir that keeps the stack's files (child logs); default: a temp dir, removed",
    )
    parser.add_argument(
        "--faults", action="store_true", help="answer 20%% of calls to every API 503 and 5%% 429 (Retry-After 0.2 s)"
    )
    return parser.parse_args(argv)


# -- statistics ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so small samples still give p99."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt_ms(values: Sequence[float], qs: Sequence[float] = (0.5, 0.95)) -> str:
    parts = [f"p{round(q * 100)} {percentile(values, q) * 1000:.0f} ms" for q in qs]
    return f"{', '.join(parts)} (n={len(values)})"


# -- the stack ----------------------------------------------------------------------------------------


def warm_up(settings: Settings, timeout_s: float) -> RunRow | None:
    """One run end to end: only then have all consumer groups joined (session timeout / 2 here)."""
    run_ids = produce_requests(settings, sample_requests(1, requested_by="bench-warmup"))
    rows = wait_for_runs(settings, run_ids, timeout_s)
    return rows[0] if rows and rows[0].status != "running" else None


def inject_faults(settings: Settings) -> None:
    with SandboxClient(settings.sandbox_url) as sandbox:
        for api in API_NAMES:
            sandbox.set_faults(api, FAULTS)


def load_events(settings: Settings, run_ids: list[str]) -> list[EventRow]:
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT run_id, type, event_id, causation_id, occurred_at, (payload->>'duration_ms')::int"
            " FROM run_events WHERE run_id = ANY(%s)",
            (run_ids,),
        ).fetchall()
    return [EventRow(*row) for row in rows]


def hop_latencies(events: list[EventRow]) -> tuple[list[float], list[float], int]:
    """(ToolResult → DecisionRecorded, ToolCommand → ToolResult) in seconds, and unmatched results.

    Pairs follow causation ids rather than time order: a decision's causation id is the last event
    folded into the snapshot it was made on, and a result's is its command's event id, so each pair
    is exact even when two events share a millisecond.
    """
    by_id = {e.event_id: e for e in events}
    decision_for = {e.causation_id: e for e in events if e.type == "DecisionRecorded" and e.causation_id}
    decide: list[float] = []
    tool: list[float] = []
    unmatched = 0
    for result in (e for e in events if e.type == "ToolResult"):
        decision = decision_for.get(result.event_id)
        if decision is None:
            unmatched += 1
        else:
            decide.append((decision.occurred_at - result.occurred_at).total_seconds())
        command = by_id.get(result.causation_id or "")
        if command is not None and command.type == "ToolCommand":
            tool.append((result.occurred_at - command.occurred_at).total_seconds())
    return decide, tool, unmatched


def topic_fill(settings: Settings, timeout_s: float = 60.0) -> tuple[list[TopicFill], list[DeadLetter]]:
    """Messages per topic, counted by reading every partition from offset 0 to EOF, and the dead letters.

    ListOffsets' high-water mark is wrong on the embedded broker (BROKER-NOTES), so the count comes
    from the fetch itself, which is also what a consumer pays for.
    """
    topics = [spec.name for spec in physical(settings, all_topics(tuple(API_NAMES)))]
    dlq_topic = settings.topic(DLQ_TOPIC)
    dead: list[DeadLetter] = []
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"bench-count-{uuid.uuid4()}",  # never committed; assign() needs a group id anyway
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": settings.fetch_wait_ms,
        }
    )
    metadata = consumer.list_topics(timeout=10)
    # A sandbox API without a deployed tool (crm) has no command topic: nothing to count there.
    partitions = [
        TopicPartition(t, p, 0) for t in topics if t in metadata.topics for p in metadata.topics[t].partitions
    ]
    consumer.assign(partitions)
    counts: Counter[tuple[str, int]] = Counter({(tp.topic, tp.partition): 0 for tp in partitions})
    pending = set(counts)
    deadline = time.monotonic() + timeout_s
    try:
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=1.0):
                err = msg.error()
                if err is None:
                    counts[(msg.topic(), msg.partition())] += 1
                    if msg.topic() == dlq_topic:
                        dead.append(DeadLetter.from_message(msg))
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard((msg.topic(), msg.partition()))
                else:
                    raise RuntimeError(f"counting {msg.topic()}: {err}")
    finally:
        consumer.close()
    if pending:
        print(f"  warning: {len(pending)} partitions did not reach EOF within {timeout_s:.0f}s; counts are low")
    fills = []
    for name in topics:
        per_partition = [n for (t, _p), n in counts.items() if t == name]
        fills.append(TopicFill(name, sum(per_partition), max(per_partition, default=0)))
    return fills, dead


# -- reporting ----------------------------------------------------------------------------------------


def print_machine(settings: Settings, args: argparse.Namespace) -> None:
    nproc = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: nproc {nproc}, python {platform.python_version()}, load average {load}")
    print(
        f"settings: partitions {settings.partitions}, fetch_wait_ms {settings.fetch_wait_ms},"
        f" session_timeout_ms {settings.session_timeout_ms}, runs {args.runs}, faults {'on' if args.faults else 'off'}"
    )


def print_runs(rows: list[RunRow], submitted_at: datetime, expected: int) -> int:
    """Returns the number of completed runs."""
    statuses = Counter(r.status for r in rows)
    completed = statuses.get("completed", 0)
    ended = [r for r in rows if r.ended_at is not None]
    print(
        f"runs: {completed}/{expected} completed, {statuses.get('failed', 0)} failed,"
        f" {statuses.get('escalated', 0)} escalated, {statuses.get('running', 0)} still running,"
        f" {expected - len(rows)} never projected"
    )
    if not ended:
        return completed
    # From the first byte submitted to the last run's end event, both at event-time precision.
    wall = (max(r.ended_at for r in ended if r.ended_at) - submitted_at).total_seconds()
    print(f"wall time: {wall:.2f} s (submit → last ended_at), {completed / wall:.2f} completed runs/s")
    durations = [d for r in ended if (d := r.duration_s) is not None]
    qs = (0.5, 0.95, 0.99)
    print(
        f"run duration: {' '.join(f'p{round(q * 100)} {percentile(durations, q):.2f} s' for q in qs)},"
        f" max {max(durations):.2f} s"
    )
    return completed


def print_hops(events: list[EventRow]) -> None:
    decide, tool, unmatched = hop_latencies(events)
    print(f"hop ToolResult → DecisionRecorded (state + decision processors): {fmt_ms(decide)}")
    print(f"hop ToolCommand → ToolResult (tool incl. sandbox call): {fmt_ms(tool)}")
    # The tool's own timing of the call splits the tool hop into HTTP work and Kafka/queueing time.
    calls = [e.duration_ms / 1000 for e in events if e.type == "ToolResult" and e.duration_ms is not None]
    print(f"  of which the external call (ToolResult.duration_ms, retries incl.): {fmt_ms(calls)}")
    if unmatched:
        print(f"  note: {unmatched} ToolResults had no DecisionRecorded caused by them")


def print_topics(settings: Settings) -> None:
    fills, dead = topic_fill(settings)
    print("topic fill at the end (messages, all partitions; largest partition):")
    for fill in fills:
        print(f"  {fill.name:<28} {fill.messages:>7}  (max {fill.max_per_partition}/partition)")
    # A dead letter in a benchmark is a finding, not noise: say who sent it and why.
    reasons = Counter((d.processor, d.reason, d.source_topic.removeprefix(settings.topic_prefix)) for d in dead)
    for (processor, reason, source), n in reasons.most_common():
        example = next(d.error for d in dead if (d.processor, d.reason) == (processor, reason))
        print(f"  dead letters: {n} x {processor}/{reason} from {source}, e.g. {example[:160]}")


def print_restarts(stack: Stack) -> None:
    restarts = {name: child.restarts for name, child in stack.children.items() if child.restarts}
    print(f"child restarts: {restarts or 'none'}")


def print_sandbox(settings: Settings, run_ids: list[str]) -> int:
    """Sandbox stats and duplicated effects; returns the number of duplicates."""
    with SandboxClient(settings.sandbox_url) as sandbox:
        stats = sandbox.stats()
        effects = sandbox.effects()
    print("sandbox (includes the warm-up run):")
    for api, s in stats.items():
        faults = ", ".join(f"{kind} {n}" for kind, n in s["faults"].items() if n)
        print(
            f"  {api:<7} requests {s['requests']:>5}  effects {s['effects']:>4}  replayed {s['replayed']:>3}"
            f"  faults: {faults or 'none'}"
        )
    # Keyed by op as well as (run, api): a failed run's compensation (e.g. closing its Jira project)
    # is a second, legitimate effect on the same API and must not read as a duplicate.
    wanted = set(run_ids)
    per_key = Counter((e.run_id, e.api, e.op) for e in effects if e.run_id in wanted)
    duplicates = sum(n - 1 for n in per_key.values() if n > 1)
    pairs = Counter((e.run_id, e.api) for e in effects if e.run_id in wanted)
    print(
        f"duplicated effects: {duplicates} (must be 0); (run_id, api) pairs with >1 effect:"
        f" {sum(1 for n in pairs.values() if n > 1)}"
    )
    return duplicates


# -- main ---------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace, data_dir: Path) -> int:
    started = time.monotonic()
    # Free ports: a benchmark must not take (or be refused) the addresses of a `up` running on this machine.
    with Stack(Settings(data_dir=data_dir, partitions=args.partitions, broker_port=0, sandbox_port=0)) as stack:
        settings = stack.settings
        print_machine(settings, args)
        print(f"stack up in {time.monotonic() - started:.1f} s", flush=True)
        warm = time.monotonic()
        if warm_up(settings, args.warmup_timeout) is None:
            print(f"warm-up run did not end within {args.warmup_timeout:.0f} s", file=sys.stderr)
            return 1
        print(f"warm-up run ended after {time.monotonic() - warm:.1f} s", flush=True)
        if args.faults:
            inject_faults(settings)
        requests = sample_requests(args.runs, requested_by="bench")
        submitted_at = min(r.occurred_at for r in requests)  # created_at of the runs is this instant
        run_ids = produce_requests(settings, requests)
        print(f"submitted {len(run_ids)} runs", flush=True)
        rows = wait_for_runs(settings, run_ids, args.timeout)
        completed = print_runs(rows, submitted_at, len(run_ids))
        print_hops(load_events(settings, run_ids))
        print_topics(settings)
        print_restarts(stack)
        duplicates = print_sandbox(settings, run_ids) if args.faults else 0
    ok = completed == len(run_ids) and duplicates == 0
    print("OK" if ok else "FAILED: not every run completed, or an effect was duplicated")
    return 0 if ok else 1


def in_data_dir(args: argparse.Namespace, run: Callable[[argparse.Namespace, Path], int], prefix: str) -> int:
    """Run a benchmark in ``--data-dir`` (which must be new or empty) or in a temp dir removed after."""
    if args.data_dir is not None:
        # A reused dir would bring its PostgreSQL rows and topics along, and they would be counted again.
        if args.data_dir.exists() and any(args.data_dir.iterdir()):
            print(f"--data-dir {args.data_dir} must be new or empty", file=sys.stderr)
            return 2
        return run(args, args.data_dir)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return run(args, Path(tmp))


def main(argv: Sequence[str] | None = None) -> int:
    return in_data_dir(parse_args(argv), bench, "streamagent-bench-")


if __name__ == "__main__":
    sys.exit(main())
