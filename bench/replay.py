"""Replay benchmark (issue 12): ``streamagent replay`` events/s next to a raw consume of the same topics.

Starts the embedded stack (as ``run_throughput.py`` does), fills the run topics with completed onboarding
runs (bursts of ``--burst`` until the events, results and command topics hold ``--events`` records, 100,000
by default), then on the idle stack measures:

- **raw consume**: the same topics read from offset 0 to EOF by one confluent consumer (assign, no group,
  no decode): the floor any replay pays to read the log;
- **replay**: ``rebuild`` (read + decode + fold through the state processor's code + projection into a
  schema of its own), i.e. the time to rebuild that many events, and its events/s;
- **verify**: the comparison with the live state table, snapshots and projection.

    .venv/bin/python bench/replay.py                     # 100,000 events
    .venv/bin/python bench/replay.py --events 20000      # quicker

Prints a human table and then one line of pure JSON per result. Exit 0 when the replay verified clean
and reached the target (replay >= 0.5x raw consume), else 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from streamagent.config import Settings, get_settings
from streamagent.console.demo import sample_requests, wait_for_runs
from streamagent.console.devstack.stack import Stack
from streamagent.console.replay.rebuild import drop_schema, rebuild
from streamagent.console.replay.source import run_topics
from streamagent.console.replay.verify import verify
from streamagent.kafka import admin
from streamagent.submit import produce_requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_throughput import in_data_dir, warm_up  # a sibling script, not a package

TARGET = 0.5  # replay events/s as a share of the raw consume rate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="records in the run topics to replay")
    parser.add_argument("--burst", type=int, default=1000, help="runs submitted at once while filling")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to fill the topics")
    parser.add_argument("--data-dir", type=Path, help="keep the stack's files here (new or empty dir)")
    parser.add_argument("--profile", action="store_true", help="print where the replay spends its time")
    return parser.parse_args(argv)


def count_records(settings: Settings) -> int:
    fold, commands = run_topics(settings)
    meta = admin(settings).list_topics(timeout=10).topics
    return _read(settings, [(t, p) for t in fold + commands for p in meta[t].partitions])[0]


def _read(settings: Settings, partitions: list[tuple[str, int]]) -> tuple[int, float]:
    """(records, seconds) reading ``partitions`` from their start to EOF, no group, no decode."""
    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "bench-raw-consume",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
            "queued.min.messages": 100_000,
            "fetch.message.max.bytes": 16 * 1024 * 1024,
        }
    )
    started = time.monotonic()
    count = 0
    try:
        c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in partitions])
        left = set(partitions)
        while left:
            for msg in c.consume(2000, 0.2):
                err = msg.error()
                if err is None:
                    count += 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    left.discard((msg.topic(), msg.partition()))
    finally:
        c.close()
    return count, time.monotonic() - started


def fill(settings: Settings, events: int, burst: int, deadline: float) -> int:
    """Submit bursts of runs until the run topics hold ``events`` records; returns the runs submitted."""
    runs = 0
    while (have := count_records(settings)) < events:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {have:,} of {events:,} records before the deadline")
        size = max(1, min(burst, round((events - have) / 14.5) + 1))  # ~14.5 records per completed run
        ids = produce_requests(settings, sample_requests(size, requested_by="bench-replay"))
        rows = wait_for_runs(settings, ids, max(60.0, deadline - time.monotonic()))
        runs += size
        print(f"  filled: {runs:,} runs, {have:,} records before this burst; {len(rows or [])} ended", flush=True)
    return runs


def bench(args: argparse.Namespace, data: Path) -> int:
    # Free ports: a benchmark must not take (or be refused) the addresses of a `up` running on this machine.
    free = {"broker_port": 0, "sandbox_port": 0}
    base = get_settings().model_copy(update={"data_dir": data, "partitions": args.partitions, **free})
    with Stack(base) as stack:
        s = stack.settings
        if warm_up(s, 120) is None:
            print("warm-up run did not end", file=sys.stderr)
            return 1
        runs = fill(s, args.events, args.burst, time.monotonic() + args.timeout)
        fold, commands = run_topics(s)
        meta = admin(s).list_topics(timeout=10).topics
        partitions = [(t, p) for t in fold + commands for p in meta[t].partitions]
        raw_count, raw_s = _read(s, partitions)
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            rebuilt = profiler.runcall(rebuild, s)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        else:
            rebuilt = rebuild(s)
        started = time.monotonic()
        report = verify(s, rebuilt)
        verify_s = time.monotonic() - started
        drop_schema(s, rebuilt.schema)
    raw_rate = raw_count / raw_s
    replay_rate = rebuilt.events / rebuilt.seconds
    ratio = replay_rate / raw_rate
    clean = report.clean(strict=True)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nreplay benchmark, {when}, {platform.node()}, {args.partitions} partitions, {runs:,} runs")
    print(f"{'what':<24} {'records':>9} {'seconds':>8} {'records/s':>10}")
    print(f"{'raw consume':<24} {raw_count:>9,} {raw_s:>8.2f} {raw_rate:>10,.0f}")
    print(f"{'replay (rebuild)':<24} {rebuilt.events:>9,} {rebuilt.seconds:>8.2f} {replay_rate:>10,.0f}")
    print(f"{'  read':<24} {rebuilt.read.count:>9,} {rebuilt.read.seconds:>8.2f}")
    print(f"{'  decode':<24} {'':>9} {rebuilt.decode_s:>8.2f}")
    print(f"{'  fold':<24} {'':>9} {rebuilt.fold_s:>8.2f}")
    print(f"{'  project':<24} {'':>9} {rebuilt.project_s:>8.2f}")
    print(f"{'verify':<24} {'':>9} {verify_s:>8.2f}")
    print("\n".join(report.lines()))
    print(
        f"replay / raw consume = {ratio:.2f} (target >= {TARGET}); verification "
        + ("identical" if clean else f"{report.count('differ')} differ, {report.count('behind')} behind")
    )
    common = {"date": when, "partitions": args.partitions, "runs": runs}
    print(
        json.dumps(
            {
                "bench": "replay",
                "metric": "raw_consume",
                "records": raw_count,
                "seconds": round(raw_s, 3),
                "records_per_s": round(raw_rate),
                **common,
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "replay",
                "metric": "rebuild",
                "records": rebuilt.events,
                "seconds": round(rebuilt.seconds, 3),
                "records_per_s": round(replay_rate),
                "read_s": round(rebuilt.read.seconds, 3),
                "decode_s": round(rebuilt.decode_s, 3),
                "fold_s": round(rebuilt.fold_s, 3),
                "project_s": round(rebuilt.project_s, 3),
                "ratio_to_raw": round(ratio, 3),
                **common,
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "replay",
                "metric": "verify",
                "seconds": round(verify_s, 3),
                "identical": clean,
                **{k: report.count(k) for k in ("differ", "behind", "ahead")},
                **common,
            }
        )
    )
    return 0 if clean and ratio >= TARGET else 1


def main(argv: Sequence[str] | None = None) -> int:
    return in_data_dir(parse_args(argv), bench, "streamagent-bench-replay-")


if __name__ == "__main__":
    sys.exit(main())
