"""One-hop latency of the embedded broker, memory vs journal storage, as its history grows.

A hop is: produce one record (acks=all, idempotent, as the stack's producers) and receive it in a
consumer that is already assigned. Between measurements the partition is filled with more history
(record batches of 20 records, like the stack's small produce batches), so the table shows whether a
storage mode gets slower as its log grows. Each (storage, history) prints one row and one JSON line.

    .venv/bin/python bench/broker_hop.py                       # both storages, fetch wait 50 ms
    .venv/bin/python bench/broker_hop.py --fetch-wait-ms 5 --history 0,5000,20000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streamagent.console.devstack.embedded import EmbeddedBroker

TOPIC = "hop"


def _fill(producer: Producer, batches: int) -> None:
    for i in range(batches):
        for j in range(20):
            producer.produce(TOPIC, value=b"h" * 200, partition=0, key=b"%d" % j)
        producer.flush(10)  # one produce request, one batch
        if i % 500 == 0:
            producer.poll(0)


def _hops(producer: Producer, consumer: Consumer, count: int) -> list[float]:
    out = []
    for i in range(count):
        marker = b"ping-%d-%f" % (i, time.time())
        started = time.perf_counter()
        producer.produce(TOPIC, value=marker, partition=0)
        producer.flush(10)
        while True:
            msg = consumer.poll(5)
            if msg is not None and not msg.error() and msg.value() == marker:
                break
        out.append((time.perf_counter() - started) * 1000)
    return out


def measure(storage: str, history: list[int], pings: int, fetch_wait_ms: int) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hop-") as tmp:
        broker = EmbeddedBroker(Path(tmp) / "broker", storage=storage).start()
        try:
            bootstrap = broker.bootstrap_servers
            admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until its futures resolve
            for f in admin.create_topics([NewTopic(TOPIC, 1, 1)]).values():
                f.result()
            producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0})
            consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "hop", "fetch.wait.max.ms": fetch_wait_ms})
            # Assigned once, from the start: the warm-up hops read through the history just written
            # (seeking to the end would ask ListOffsets, which is wrong on Tansu; see BROKER-NOTES).
            consumer.assign([TopicPartition(TOPIC, 0, 0)])
            filled = 0
            for target in history:
                _fill(producer, target - filled)
                filled = target
                _hops(producer, consumer, 5)  # warm-up, and catching up with the history
                hops = sorted(_hops(producer, consumer, pings))
                row = {
                    "storage": storage,
                    "history_batches": target,
                    "pings": pings,
                    "fetch_wait_ms": fetch_wait_ms,
                    "p50_ms": round(statistics.median(hops), 2),
                    "p99_ms": round(hops[int(len(hops) * 0.99) - 1], 2),
                    "mean_ms": round(statistics.fmean(hops), 2),
                }
                rows.append(row)
                print(f"{storage:<8} {target:>8} {row['p50_ms']:>8} {row['p99_ms']:>8} {row['mean_ms']:>8}", flush=True)
                print(json.dumps(row), flush=True)
            consumer.close()
        finally:
            broker.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", choices=["memory", "journal", "both"], default="both")
    parser.add_argument("--history", default="0,2000,10000", help="batches of history before each row")
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument("--fetch-wait-ms", type=int, default=50, help="the stack's default is 50")
    args = parser.parse_args()
    history = [int(x) for x in args.history.split(",")]
    print(f"{'storage':<8} {'history':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for storage in ("memory", "journal") if args.storage == "both" else (args.storage,):
        measure(storage, history, args.pings, args.fetch_wait_ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
