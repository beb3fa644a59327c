"""Load benchmark (issue 7): bursts of onboarding runs through one embedded stack, cost per run.

Starts the embedded stack once (as ``run_throughput.py`` does), completes one warm-up run, then for each
burst produces N requests at once and polls the PostgreSQL projection until all of them have ended. Per
burst it measures throughput and run duration from the projection's event timestamps, the messages each
run added to every topic on the broker (counted by fetching to partition EOF), the CPU each process of the
stack spent (from /proc), and how many tool commands were sent twice.

    .venv/bin/python bench/load.py --bursts 200,1000,5000        # W1: bursts in sequence on one stack
    .venv/bin/python bench/load.py --soak 10x1000                 # W1: ten bursts of 1,000, one stack
    .venv/bin/python bench/load.py --tool-latency-ms 200 --runs 2000   # W2: every API answers after 200 ms
    .venv/bin/python bench/load.py --runs 300 --instant-tools      # tools answer in-process, no HTTP

Tools call the sandbox over HTTP by default (``"tools": "http"``, what the peers' W3 matches);
``--instant-tools`` sets STREAMAGENT_TOOLS_INSTANT so each tool answers from the sandbox's API model in
its own process (``"tools": "instant"``, the loop's own cost, beside the peers' W1).

Each burst prints a human table and then exactly one line of pure JSON (no prefix) with the figures.
Exit status 0 when every run of every burst completed, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition
from streamagent.tools.sandbox.apis import API_NAMES
from streamagent.tools.sandbox.client import SandboxClient
from streamagent.tools.sandbox.faults import FaultSpec

from streamagent import codec, db
from streamagent.config import Settings, get_settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.submit import produce_requests
from streamagent.topics import COMMANDS_PREFIX

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_throughput import in_data_dir, percentile, warm_up  # a sibling script, not a package

CLK_TCK = os.sysconf("SC_CLK_TCK")
SANDBOX = "sandbox"  # the stand-in for third-party SaaS APIs: reported, but not part of cpu_ms_per_run
POLL_S = 0.5  # projection polling interval; only decides when the "after" CPU sample is taken
CPU_POLL_S = 2.0  # /proc scan interval during a burst (catches a supervised child that is restarted)


# -- command line ---------------------------------------------------------------------------------------


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def soak_spec(text: str) -> list[int]:
    count, sep, size = text.lower().partition("x")
    if not sep or not count.isdigit() or not size.isdigit() or int(count) <= 0 or int(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected COUNTxSIZE such as 10x1000, got {text!r}")
    return [int(size)] * int(count)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bursts of onboarding runs through one embedded stack: runs/s, latency, messages and CPU per run.",
        epilog="W1 (default): instant APIs. W2: --tool-latency-ms delays every sandbox API answer. "
        "Each burst prints a table and one line of JSON; exit 1 unless every run completed.",
    )
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--bursts", type=positive_ints, help="comma-separated burst sizes, run in sequence (200,1000)")
    sizes.add_argument("--soak", type=soak_spec, help="COUNTxSIZE: COUNT bursts of SIZE runs, e.g. 10x1000")
    sizes.add_argument("--runs", type=int, help="one burst of this many runs (default: 2000 with W2, else 200)")
    parser.add_argument(
        "--tool-latency-ms", type=int, default=0, help="W2: every sandbox API answers after this delay (default 0)"
    )
    parser.add_argument(
        "--instant-tools",
        action="store_true",
        help="tools answer in their own process from the sandbox's API model, without HTTP (STREAMAGENT_TOOLS_INSTANT)",
    )
    parser.add_argument(
        "--partitions", type=int, default=Settings().partitions, help="partitions per topic (default: the setting's)"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds each burst may take (default 60 + 0.5 s per run of the burst)"
    )
    parser.add_argument(
        "--warmup-timeout", type=float, default=120.0, help="seconds the warm-up run may take (default 120)"
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=2.0,
        help="seconds the idle stack's CPU is measured before each burst (default 2; 0 skips it)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="new or empty dir that keeps the stack's files (child logs); default: a temp dir, removed",
    )
    args = parser.parse_args(argv)
    if args.tool_latency_ms < 0:
        parser.error("--tool-latency-ms must not be negative")
    if args.instant_tools and args.tool_latency_ms:
        parser.error("--tool-latency-ms delays the sandbox server, which --instant-tools does not call")
    if args.runs is not None and args.runs <= 0:
        parser.error("--runs must be positive")
    args.sizes = args.bursts or args.soak or [args.runs or (2000 if args.tool_latency_ms else 200)]
    args.mode = "w2" if args.tool_latency_ms else "w1"
    return args


# -- CPU from /proc ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    start: int  # clock ticks after boot; (pid, start) names a process even if the pid is reused
    own: int  # utime + stime, clock ticks
    reaped: int  # cutime + cstime: children this process has waited for


def read_all_stats() -> dict[int, ProcStat]:
    stats: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # the process ended between the listing and the read
            continue
        # The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
        fields = raw[raw.rindex(b")") + 2 :].split()
        stats[int(entry.name)] = ProcStat(
            ppid=int(fields[1]),
            start=int(fields[19]),
            own=int(fields[11]) + int(fields[12]),
            reaped=int(fields[13]) + int(fields[14]),
        )
    return stats


def tree_ticks(root: int, stats: dict[int, ProcStat]) -> int | None:
    """CPU of ``root`` and every live descendant, plus what each of them reaped from ended children.

    Monotonic as long as processes of the tree are reaped inside the tree (a PostgreSQL backend by the
    postmaster): an ended child's time moves from "live" to its parent's cutime/cstime, never both.
    """
    if root not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats[pid].own + stats[pid].reaped
        todo.extend(children.get(pid, ()))
    return total


def machine_ticks() -> int:
    """Busy CPU ticks of the whole machine (all cores) from /proc/stat: everything but idle and iowait."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def self_ticks() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round((usage.ru_utime + usage.ru_stime) * CLK_TCK)


def stack_roots(stack: Stack) -> dict[str, int]:
    """The stack's processes, by name. Re-read every time: the supervisor restarts a dead child with a new pid."""
    roots: dict[str, int] = {}
    if stack.broker is not None and stack.broker.pid is not None:
        roots["broker"] = stack.broker.pid
    if stack.postgres is not None and stack.postgres.pid is not None:
        roots["postgres"] = stack.postgres.pid
    for name, child in list(stack.children.items()):
        if child.pid is not None:
            roots[name] = child.pid
    return roots


@dataclass
class CpuMeter:
    """CPU ticks each process tree of the stack spent between ``begin`` and ``end``.

    Between the two it can be ``poll``ed: a supervised child that dies is reaped by this process (the
    supervisor), not inside its tree, so its time is kept as last seen and its successor counts from 0.
    """

    stack: Stack
    first: dict[tuple[str, int, int], int] = field(default_factory=dict)
    last: dict[tuple[str, int, int], int] = field(default_factory=dict)
    machine0: int = 0
    self0: int = 0
    started: float = 0.0
    machine_busy: int = 0
    driver: int = 0
    seconds: float = 0.0

    def _sample(self) -> dict[tuple[str, int, int], int]:
        stats = read_all_stats()
        sample = {}
        for name, pid in stack_roots(self.stack).items():
            ticks = tree_ticks(pid, stats)
            if ticks is not None:
                sample[(name, pid, stats[pid].start)] = ticks
        return sample

    def begin(self) -> None:
        self.first = self._sample()
        self.last = dict(self.first)
        self.machine0, self.self0, self.started = machine_ticks(), self_ticks(), time.monotonic()

    def poll(self) -> None:
        self.last.update(self._sample())

    def end(self) -> None:
        self.poll()
        self.machine_busy = machine_ticks() - self.machine0
        self.driver = self_ticks() - self.self0
        self.seconds = time.monotonic() - self.started

    def ms_by_process(self) -> dict[str, float]:
        ms: Counter[str] = Counter()
        for key, ticks in self.last.items():
            ms[key[0]] += (ticks - self.first.get(key, 0)) * 1000 / CLK_TCK
        return dict(ms)


def idle_cpu_pct(stack: Stack, seconds: float) -> float | None:
    """CPU the stack (sandbox excluded) burns doing nothing, in % of one core: consumers polling the broker."""
    if seconds <= 0:
        return None
    meter = CpuMeter(stack)
    meter.begin()
    time.sleep(seconds)
    meter.end()
    busy = sum(ms for name, ms in meter.ms_by_process().items() if name != SANDBOX)
    return round(busy / 10 / meter.seconds, 1)


# -- messages on the broker -----------------------------------------------------------------------------


@dataclass
class TopicDelta:
    messages: Counter[str] = field(default_factory=Counter)
    commands: int = 0
    duplicate_commands: int = 0
    undecodable_commands: int = 0
    unfinished_partitions: int = 0


class TopicCounter:
    """Counts the messages on every topic of the broker, incrementally, by fetching to partition EOF.

    ListOffsets' high-water mark is wrong on the embedded broker (it is the start of the last batch + 1,
    see /work/shared/BROKER-NOTES.md), so, like ``run_throughput.topic_fill``, the count comes from
    reading the messages. Unlike it, each call starts where the previous one ended (so a soak reads each
    message once and gets per-burst deltas), covers every topic the broker lists (faust's changelog
    included), and decodes tool commands to find command ids sent twice. The consumer exists only while
    counting, so it does not poll the broker during a burst.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.next_offset: dict[tuple[str, int], int] = {}
        self.per_partition: Counter[tuple[str, int]] = Counter()
        self.seen_commands: set[str] = set()
        self.commands_prefix = settings.topic(COMMANDS_PREFIX)

    def count(self, timeout_s: float = 120.0) -> TopicDelta:
        delta = TopicDelta()
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": f"bench-load-count-{uuid.uuid4()}",  # assign() only; nothing is committed
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": self.settings.fetch_wait_ms,
            }
        )
        try:
            metadata = consumer.list_topics(timeout=10)
            # Kafka's own internal topics (__consumer_offsets, ...) are not the stack's traffic.
            partitions = [
                (name, p)
                for name, topic in metadata.topics.items()
                if not name.startswith("__")
                for p in topic.partitions
            ]
            consumer.assign([TopicPartition(t, p, self.next_offset.get((t, p), 0)) for t, p in partitions])
            for tp in partitions:  # every topic appears, even when nothing was added
                delta.messages[tp[0]] += 0
                self.per_partition[tp] += 0
            pending = set(partitions)
            deadline = time.monotonic() + timeout_s
            while pending and time.monotonic() < deadline:
                for msg in consumer.consume(num_messages=1000, timeout=1.0):
                    tp = (msg.topic(), msg.partition())
                    err = msg.error()
                    if err is None:
                        delta.messages[tp[0]] += 1
                        self.per_partition[tp] += 1
                        self.next_offset[tp] = msg.offset() + 1
                        if tp[0].startswith(self.commands_prefix):
                            self._command(msg.value(), delta)
                    elif err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(tp)
                        self.next_offset[tp] = max(self.next_offset.get(tp, 0), msg.offset())
                    else:
                        raise RuntimeError(f"counting {msg.topic()}: {err}")
            delta.unfinished_partitions = len(pending)
        finally:
            consumer.close()
        if delta.unfinished_partitions:
            print(f"  warning: {delta.unfinished_partitions} partitions did not reach EOF; counts are low")
        return delta

    def _command(self, value: bytes | None, delta: TopicDelta) -> None:
        try:
            command_id = codec.decode(value).command_id  # type: ignore[attr-defined]
        except Exception:
            delta.undecodable_commands += 1
            return
        delta.commands += 1
        if command_id in self.seen_commands:
            delta.duplicate_commands += 1
        self.seen_commands.add(command_id)

    def max_fill(self) -> dict[str, int]:
        fill: Counter[str] = Counter()
        for (topic, _p), n in self.per_partition.items():
            fill[topic] = max(fill[topic], n)
        return dict(fill)


# -- one burst ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTimes:
    run_id: str
    status: str
    created_at: datetime | None
    ended_at: datetime | None


def ended_count(conn: psycopg.Connection, run_ids: list[str]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM runs WHERE run_id = ANY(%s) AND status <> 'running'", (run_ids,)
    ).fetchone()
    return row[0] if row else 0


def run_times(conn: psycopg.Connection, run_ids: list[str]) -> list[RunTimes]:
    rows = conn.execute(
        "SELECT run_id, status, created_at, ended_at FROM runs WHERE run_id = ANY(%s)", (run_ids,)
    ).fetchall()
    return [RunTimes(*row) for row in rows]


def wait_ended(settings: Settings, run_ids: list[str], timeout_s: float, meter: CpuMeter) -> bool:
    """A cheap count query per poll (not ``wait_for_runs``' full row fetch): the poll runs on PostgreSQL
    during the measured window, so it should cost little."""
    deadline = time.monotonic() + timeout_s
    next_cpu = time.monotonic() + CPU_POLL_S
    last_print = time.monotonic()
    with db.connect(settings) as conn:
        while True:
            ended = ended_count(conn, run_ids)
            if ended == len(run_ids):
                return True
            now = time.monotonic()
            if now > deadline:
                return False
            if now >= next_cpu:
                meter.poll()
                next_cpu = now + CPU_POLL_S
            if now - last_print >= 15:
                print(f"  {ended}/{len(run_ids)} runs ended", flush=True)
                last_print = now
            time.sleep(POLL_S)


def restarts(stack: Stack) -> dict[str, int]:
    return {name: child.restarts for name, child in stack.children.items()}


def burst(
    stack: Stack, counter: TopicCounter, index: int, size: int, args: argparse.Namespace
) -> tuple[dict[str, object], TopicDelta, dict[str, float]]:
    settings = stack.settings
    idle = idle_cpu_pct(stack, args.idle_s)
    restarts_before = restarts(stack)
    load_before = os.getloadavg()
    requests = sample_requests(size, requested_by=f"bench-load-{index}")
    meter = CpuMeter(stack)
    meter.begin()
    started = time.monotonic()
    run_ids = produce_requests(settings, requests)
    all_ended = wait_ended(settings, run_ids, args.timeout or 60 + 0.5 * size, meter)
    meter.end()
    wall = time.monotonic() - started
    load_after = os.getloadavg()
    with db.connect(settings) as conn:
        rows = run_times(conn, run_ids)
    delta = counter.count()

    statuses = Counter(r.status for r in rows)
    completed = statuses.get("completed", 0)
    ended = [r for r in rows if r.ended_at is not None and r.created_at is not None]
    first_created = min(r.occurred_at for r in requests)  # a run's created_at is its request's occurred_at
    makespan = (max(r.ended_at for r in ended) - first_created).total_seconds() if ended else float("nan")
    durations = [(r.ended_at - r.created_at).total_seconds() for r in ended]  # type: ignore[operator]
    cpu = meter.ms_by_process()
    stack_ms = sum(ms for name, ms in cpu.items() if name != SANDBOX)
    machine_ms = meter.machine_busy * 1000 / CLK_TCK
    driver_ms = meter.driver * 1000 / CLK_TCK
    total_msgs = sum(delta.messages.values())
    prefix = settings.topic_prefix
    result: dict[str, object] = {
        "mode": args.mode,
        "tools": "instant" if args.instant_tools else "http",
        "burst": size,
        "index": index,
        "completed": completed,
        "failed": statuses.get("failed", 0),
        "escalated": statuses.get("escalated", 0),
        "running": statuses.get("running", 0),
        "not_projected": size - len(rows),
        "runs_per_s": round(completed / makespan, 2) if ended and makespan > 0 else 0.0,
        "makespan_s": round(makespan, 2),
        "wall_s": round(wall, 2),
        "p50_s": round(percentile(durations, 0.5), 2),
        "p99_s": round(percentile(durations, 0.99), 2),
        "max_s": round(max(durations, default=float("nan")), 2),
        "msgs_per_run": round(total_msgs / size, 2),
        "msgs_per_run_by_topic": {
            name.removeprefix(prefix): round(n / size, 2) for name, n in sorted(delta.messages.items())
        },
        "cpu_ms_per_run": round(stack_ms / size, 2),
        "cpu_ms_per_run_by_process": {name: round(ms / size, 2) for name, ms in sorted(cpu.items())},
        "cpu_ms_per_run_incl_sandbox": round(sum(cpu.values()) / size, 2),
        "sandbox_cpu_ms_per_run": round(cpu.get(SANDBOX, 0.0) / size, 2),
        "stack_cpu_pct": round(stack_ms / 10 / meter.seconds, 1),  # % of one core, sandbox excluded
        "idle_stack_cpu_pct": idle,
        # Busy CPU of the machine not spent by the stack (sandbox included) or this script: someone else.
        "foreign_cpu_pct": round(max(0.0, machine_ms - sum(cpu.values()) - driver_ms) / 10 / meter.seconds, 1),
        "driver_cpu_ms_per_run": round(driver_ms / size, 2),
        "commands": delta.commands,
        "duplicate_commands": delta.duplicate_commands,
        "undecodable_commands": delta.undecodable_commands,
        "topic_max_partition_fill": {name.removeprefix(prefix): n for name, n in sorted(counter.max_fill().items())},
        "child_restarts": sum(restarts(stack).values()) - sum(restarts_before.values()),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "partitions": settings.partitions,
        "tool_latency_ms": args.tool_latency_ms,
        "all_ended": all_ended,
    }
    return result, delta, cpu


def print_table(result: dict[str, object], delta: TopicDelta, cpu: dict[str, float], prefix: str) -> None:
    size = int(result["burst"])  # type: ignore[call-overload]
    fill = result["topic_max_partition_fill"]
    assert isinstance(fill, dict)
    print(
        f"\nburst #{result['index']} ({result['mode']}): {result['completed']}/{size} completed,"
        f" {result['failed']} failed, {result['escalated']} escalated, {result['running']} running,"
        f" {result['not_projected']} not projected"
    )
    rows = [
        ("runs/s (completed / first created_at → last ended_at)", result["runs_per_s"]),
        ("makespan s (first request → last ended_at)", result["makespan_s"]),
        ("run duration p50 / p99 / max s", f"{result['p50_s']} / {result['p99_s']} / {result['max_s']}"),
        ("messages per run, all topics", result["msgs_per_run"]),
        ("CPU ms per run, stack without sandbox", result["cpu_ms_per_run"]),
        ("CPU ms per run, incl. sandbox (fake SaaS APIs)", result["cpu_ms_per_run_incl_sandbox"]),
        ("stack CPU during the burst, % of one core", result["stack_cpu_pct"]),
        ("idle stack CPU before the burst, % of one core", result["idle_stack_cpu_pct"]),
        ("foreign CPU (not stack, not this script), % of one core", result["foreign_cpu_pct"]),
        ("tool commands / sent twice", f"{result['commands']} / {result['duplicate_commands']}"),
        ("child restarts during the burst", result["child_restarts"]),
        ("load average before → after", f"{result['load_avg_before']} → {result['load_avg_after']}"),
    ]
    for label, value in rows:
        print(f"  {label:<58} {value}")
    print(f"  {'topic':<40} {'msgs/run':>9} {'added':>8} {'max/partition':>14}")
    for name, n in sorted(delta.messages.items()):
        short = name.removeprefix(prefix)
        print(f"  {short:<40} {n / size:>9.2f} {n:>8} {fill.get(short, 0):>14}")
    print(f"  {'process (CPU during the burst)':<40} {'ms/run':>9} {'ms':>8}")
    for name, ms in sorted(cpu.items(), key=lambda kv: -kv[1]):
        note = "  (excluded: stands in for third-party APIs)" if name == SANDBOX else ""
        print(f"  {name:<40} {ms / size:>9.2f} {ms:>8.0f}{note}")


# -- main -----------------------------------------------------------------------------------------------


def set_latency(settings: Settings, latency_ms: int) -> None:
    with SandboxClient(settings.sandbox_url) as sandbox:
        for api in API_NAMES:
            sandbox.set_faults(api, FaultSpec(latency_ms=latency_ms))


def print_header(settings: Settings, args: argparse.Namespace) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: nproc {len(os.sched_getaffinity(0))}, python {platform.python_version()}, load average {load}")
    print(
        f"settings: partitions {settings.partitions}, fetch_wait_ms {settings.fetch_wait_ms},"
        f" batch_size {settings.batch_size}, linger_ms {settings.linger_ms},"
        f" max_running_runs {settings.max_running_runs},"
        f" session_timeout_ms {settings.session_timeout_ms}; mode {args.mode},"
        f" tools {'instant (in-process)' if args.instant_tools else 'http'}"
        f" (tool latency {args.tool_latency_ms} ms), bursts {','.join(map(str, args.sizes))}"
    )


def bench(args: argparse.Namespace, data_dir: Path) -> int:
    started = time.monotonic()
    # Every other setting comes from the environment (STREAMAGENT_*), so tuning runs need no code change.
    # Free ports: a benchmark must not take (or be refused) the addresses of a `up` running on this machine.
    free = {"broker_port": 0, "sandbox_port": 0}
    chosen = {"data_dir": data_dir, "partitions": args.partitions, "tools_instant": args.instant_tools}
    base = get_settings().model_copy(update={**chosen, **free})
    with Stack(base) as stack:
        settings = stack.settings
        print_header(settings, args)
        print(f"stack up in {time.monotonic() - started:.1f} s", flush=True)
        warm = time.monotonic()
        if warm_up(settings, args.warmup_timeout) is None:
            print(f"warm-up run did not end within {args.warmup_timeout:.0f} s", file=sys.stderr)
            return 1
        print(f"warm-up run ended after {time.monotonic() - warm:.1f} s", flush=True)
        if args.tool_latency_ms:
            set_latency(settings, args.tool_latency_ms)
        counter = TopicCounter(settings)
        baseline = counter.count()  # everything up to here (the warm-up) is excluded
        print(f"baseline: {sum(baseline.messages.values())} messages on {len(baseline.messages)} topics", flush=True)
        ok = True
        for index, size in enumerate(args.sizes, start=1):
            print(f"burst #{index}: {size} runs", flush=True)
            result, delta, cpu = burst(stack, counter, index, size, args)
            print_table(result, delta, cpu, settings.topic_prefix)
            print(json.dumps(result), flush=True)
            ok = ok and result["completed"] == size
    print("OK" if ok else "FAILED: not every run completed")
    return 0 if ok else 1


def main(argv: Iterable[str] | None = None) -> int:
    return in_data_dir(parse_args(list(argv) if argv is not None else None), bench, "streamagent-load-")


if __name__ == "__main__":
    sys.exit(main())
