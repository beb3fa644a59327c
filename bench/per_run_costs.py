"""What one run costs the shared infrastructure: messages and bytes per topic, PostgreSQL statements and WAL.

The inputs of the capacity plan (``docs/operations/capacity.md``) that do not depend on how fast the machine
is: they are counts, so they can be taken on a busy machine and hold on any other. Starts the embedded
stack, completes a warm-up run, resets PostgreSQL's statement statistics (``pg_stat_statements``, which the
embedded PostgreSQL preloads), then runs ``--runs`` onboarding runs and reads:

- every topic from where the warm-up left it to its end: messages and bytes (key + value + headers) per run;
- ``pg_stat_statements``: calls per run of every statement, grouped by the table it writes or reads;
- ``pg_stat_wal``: WAL bytes and records per run; ``pg_stat_database``: commits per run.

    .venv/bin/python bench/per_run_costs.py --runs 200

Prints a human table, then one JSON line per section (``"section": "topics" | "statements" | "totals"``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition

from streamagent.config import Settings, get_settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.submit import produce_requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_throughput import in_data_dir, wait_for_runs, warm_up  # a sibling script, not a package


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs in the measured burst (default 200)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the burst to end")
    parser.add_argument("--data-dir", type=Path, default=None, help="new or empty dir (default: a temp dir)")
    return parser.parse_args(argv)


class TopicBytes:
    """Messages and bytes per topic since the previous ``count()``, read to partition EOF (the embedded
    broker's ListOffsets high-water mark is wrong, ``BROKER-NOTES.md``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.next_offset: dict[tuple[str, int], int] = {}

    def count(self) -> tuple[Counter[str], Counter[str]]:
        messages: Counter[str] = Counter()
        size: Counter[str] = Counter()
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": f"bench-costs-{uuid.uuid4()}",  # assign() only; nothing is committed
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": self.settings.fetch_wait_ms,
            }
        )
        try:
            topics = consumer.list_topics(timeout=10).topics
            parts = [(t, p) for t, meta in topics.items() if not t.startswith("__") for p in meta.partitions]
            consumer.assign([TopicPartition(t, p, self.next_offset.get((t, p), 0)) for t, p in parts])
            pending = set(parts)
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                for msg in consumer.consume(1000, 1.0):
                    tp = (msg.topic(), msg.partition())
                    if msg.error() is None:
                        messages[tp[0]] += 1
                        headers = sum(len(k) + len(v or b"") for k, v in msg.headers() or [])
                        size[tp[0]] += len(msg.key() or b"") + len(msg.value() or b"") + headers
                        self.next_offset[tp] = msg.offset() + 1
                    elif msg.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(tp)
            if pending:
                print(f"  warning: {len(pending)} partitions did not reach EOF; counts are low")
        finally:
            consumer.close()
        return messages, size


_TABLE = re.compile(r"\b(?:INTO|UPDATE|FROM|JOIN)\s+([a-z_][a-z0-9_.]*)", re.IGNORECASE)
_VERB = re.compile(r"^\s*(\w+)")


def statement_kind(query: str) -> tuple[str, str]:
    """(verb, first table) of a normalised statement, e.g. ('INSERT', 'run_events')."""
    verb_match = _VERB.match(query)
    verb = (verb_match.group(1) if verb_match else "?").upper()  # WITH: a statement with a CTE
    table_match = _TABLE.search(query)
    return verb, table_match.group(1) if table_match else "-"


def reset_statistics(conn: psycopg.Connection) -> dict[str, int]:
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    conn.execute("SELECT pg_stat_statements_reset()")
    return database_totals(conn)


def database_totals(conn: psycopg.Connection) -> dict[str, int]:
    wal_bytes, wal_records = conn.execute("SELECT wal_bytes, wal_records FROM pg_stat_wal").fetchone()  # type: ignore[misc]
    (commits,) = conn.execute(
        "SELECT sum(xact_commit) FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()  # type: ignore[misc]
    return {"wal_bytes": int(wal_bytes), "wal_records": int(wal_records), "commits": int(commits)}


def statements(conn: psycopg.Connection) -> list[tuple[str, int, int]]:
    """(query, calls, rows) of every statement run since the reset, in every database, busiest first."""
    rows = conn.execute(
        "SELECT query, calls, rows FROM pg_stat_statements WHERE query NOT ILIKE '%pg_stat_%' ORDER BY calls DESC"
    ).fetchall()
    return [(q, int(c), int(r)) for q, c, r in rows]


def bench(args: argparse.Namespace, data_dir: Path) -> int:
    base = get_settings().model_copy(
        update={"data_dir": data_dir, "partitions": args.partitions, "broker_port": 0, "sandbox_port": 0}
    )
    with Stack(base) as stack:
        settings = stack.settings
        if warm_up(settings, 120) is None:
            print("warm-up run did not end", file=sys.stderr)
            return 1
        topics = TopicBytes(settings)
        topics.count()  # the warm-up and the stack's start are not counted
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            before = reset_statistics(conn)
            run_ids = produce_requests(settings, sample_requests(args.runs, requested_by="bench-costs"))
            rows = wait_for_runs(settings, run_ids, args.timeout)
            completed = sum(1 for r in rows if r.status == "completed")
            # Every process flushes on its own clock; what a run causes after its end (the last projection
            # rows, the tools' offsets) is within a second of it.
            time.sleep(2.0)  # settling for the counts, not synchronisation of anything tested
            messages, size = topics.count()
            after = database_totals(conn)
            stats = statements(conn)
    runs = args.runs
    print(f"\n{runs} runs, {completed} completed; per run:")
    print(f"  {'topic':<48} {'messages':>9} {'bytes':>9}")
    for topic in sorted(messages, key=lambda t: -size[t]):
        if messages[topic]:
            name = topic.removeprefix(settings.topic_prefix)
            print(f"  {name:<48} {messages[topic] / runs:>9.2f} {size[topic] / runs:>9.0f}")
    total_messages, total_bytes = sum(messages.values()) / runs, sum(size.values()) / runs
    print(f"  {'total':<48} {total_messages:>9.2f} {total_bytes:>9.0f}")
    by_kind: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for query, calls, nrows in stats:
        kind = statement_kind(query)
        by_kind[kind][0] += calls
        by_kind[kind][1] += nrows
    total_calls = sum(c for _, c, _ in stats) / runs
    print(f"\n  {'statement':<12} {'table':<36} {'calls':>8} {'rows':>8}")
    for (verb, table), (calls, nrows) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {verb:<12} {table:<36} {calls / runs:>8.2f} {nrows / runs:>8.2f}")
    wal = {k: (after[k] - before[k]) / runs for k in after}
    print(f"  {'total':<49} {total_calls:>8.2f}")
    print(
        f"\n  PostgreSQL per run: {total_calls:.1f} statements, {wal['commits']:.1f} commits,"
        f" {wal['wal_bytes']:.0f} WAL bytes in {wal['wal_records']:.0f} records"
    )
    common = {"runs": runs, "completed": completed, "partitions": settings.partitions}
    topic_figures = {
        t.removeprefix(settings.topic_prefix): {"messages": messages[t] / runs, "bytes": size[t] / runs}
        for t in messages
        if messages[t]
    }
    print(json.dumps({"section": "topics", **common, "per_run": topic_figures}))
    kinds = {f"{v} {t}": {"calls": c / runs, "rows": r / runs} for (v, t), (c, r) in by_kind.items()}
    print(json.dumps({"section": "statements", **common, "per_run": kinds}))
    print(
        json.dumps(
            {
                "section": "totals",
                **common,
                "messages_per_run": round(total_messages, 2),
                "bytes_per_run": round(total_bytes),
                "statements_per_run": round(total_calls, 2),
                "commits_per_run": round(wal["commits"], 2),
                "wal_bytes_per_run": round(wal["wal_bytes"]),
            }
        )
    )
    return 0 if completed == runs else 1


def main(argv: Sequence[str] | None = None) -> int:
    return in_data_dir(parse_args(argv), bench, "streamagent-costs-")


if __name__ == "__main__":
    sys.exit(main())
