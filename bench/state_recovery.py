"""How long a state member takes to recover its partitions as ended runs pile up in the changelog.

On the embedded stack (its own broker, the state processor alone), the changelog is filled with
``--ended`` runs that ended and left the table (each: its last value, then its retention tombstone),
as the processor itself writes them. For each history size the state processor is started after
the fill (``first start``: it reads the changelog written since its last checkpoint), then, once it
has written a checkpoint, stopped with SIGTERM and started again (``takeover``: what a member taking
the partitions over reads). The embedded broker never compacts, so without the checkpoint every
takeover reads the whole history; ``--no-checkpoint`` shows that.

Per row: records the changelog holds, records and runs recovered, seconds from the processor's
checkpoint load to its partitions rebuilt (``recovery_s``) and from process start (``start_s``,
which includes imports and the group join). One human row and one JSON line per measurement.

    .venv/bin/python bench/state_recovery.py                      # 10,000 then 50,000 ended runs
    .venv/bin/python bench/state_recovery.py --ended 1000,5000 --no-checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

from streamagent.processors.state.app import StateWorker
from streamagent.processors.state.fold import apply
from streamagent.processors.state.store import MemoryStore

from streamagent.config import Settings
from streamagent.console.devstack.stack import Stack
from streamagent.console.replay.verify import changelog_topic
from streamagent.events import RunRequested, RunStatus
from streamagent.kafka import producer as make_producer

RECOVERED = re.compile(
    r"\[([\d\- :,]+)\] \[\d+\] \[INFO\] state recovered: (\d+) run\(s\) from checkpoints, (\d+) changelog record"
)
LOADED = re.compile(r"\[([\d\- :,]+)\] \[\d+\] \[INFO\] state checkpoints (?:loaded|not read)")


def _ended_value(settings: Settings) -> bytes:
    """A finished run's stored value, as the fold makes it (a request, then its completion)."""
    from streamagent.console.demo import sample_requests

    request: RunRequested = sample_requests(1)[0]
    state = apply(None, request, settings.run_deadline_s).state
    # Its steps as requested and the run completed: the size of a real run's value, and not active.
    state = state.model_copy(update={"snapshot": state.snapshot.model_copy(update={"status": RunStatus.completed})})
    return state.model_dump_json().encode().replace(request.run_id.encode(), b"RUNID")


def _fill(settings: Settings, first: int, last: int) -> None:
    worker = StateWorker(settings, MemoryStore(), None)  # type: ignore[arg-type] - only its partitioner
    template = _ended_value(settings)
    producer = make_producer(settings, **{"linger.ms": 50})
    topic = changelog_topic(settings)
    for i in range(first, last):
        run_id = f"bench-ended-{i:08d}"
        key = json.dumps(run_id).encode()
        p = worker.partition(run_id)
        producer.produce(topic, key=key, value=template.replace(b"RUNID", run_id.encode()), partition=p)
        producer.produce(topic, key=key, value=None, partition=p)
        if i % 5000 == 0:
            producer.flush(60)
    assert producer.flush(120) == 0


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _wait_recovered(log: Path, before: int, started: float, timeout: float = 600) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = RECOVERED.findall(text)
        if len(found) > before:
            at, runs, records = found[-1]
            loads = [_stamp(t) for t in LOADED.findall(text)]
            loaded_at = max((t for t in loads if t <= _stamp(at)), default=started)
            return {
                "runs_loaded": int(runs),
                "records_read": int(records),
                "recovery_s": round(_stamp(at) - loaded_at, 3),
                "start_s": round(_stamp(at) - started, 3),
            }
        time.sleep(0.1)  # the poll interval of a deadline-bounded wait for a log line
    raise TimeoutError(f"the state processor did not recover within {timeout}s; log: {log}")


def _recoveries(log: Path) -> int:
    return len(RECOVERED.findall(log.read_text(errors="replace"))) if log.exists() else 0


def measure(sizes: list[int], checkpoint: bool) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="state-recovery-") as tmp:
        settings = Settings(
            data_dir=Path(tmp) / "data",
            state_retention_s=1.0,
            state_checkpoint_interval_s=0.5 if checkpoint else 0.0,
            state_session_timeout_ms=2000,
        )
        with Stack(settings, tools=(), processors=("state",), restart_backoff_s=0.1) as stack:
            s = stack.settings
            log = stack.children["processor-state"].log_path
            done = 0
            for size in sizes:
                stack.undeploy("processor-state")
                _fill(s, done, size)
                done = size
                before = _recoveries(log)
                started = time.time()
                stack.add_processor("state")
                rows.append(
                    {
                        "ended_runs": size,
                        "changelog_records": 2 * size,
                        "checkpoint": checkpoint,
                        "start": "first start",
                        **_wait_recovered(log, before, started),
                    }
                )
                print(json.dumps({"bench": "state_recovery", "partial": True, **rows[-1]}), flush=True)
                if checkpoint:
                    time.sleep(2.0)  # four checkpoint intervals: the one covering the fill is written
                before = _recoveries(log)
                child = stack.children["processor-state"]
                old = child.pid
                stopping = time.time()
                assert old is not None
                os.kill(old, signal.SIGTERM)
                deadline = time.monotonic() + 300
                while (child.pid in (None, old) or not child.alive()) and time.monotonic() < deadline:
                    time.sleep(0.02)  # the supervisor restarts it once it has left
                leave_s = round(time.time() - stopping, 3)
                rows.append(
                    {
                        "ended_runs": size,
                        "changelog_records": 2 * size,
                        "checkpoint": checkpoint,
                        "start": "takeover",
                        "leave_s": leave_s,
                        **_wait_recovered(log, before, time.time()),
                    }
                )
                print(json.dumps({"bench": "state_recovery", "partial": True, **rows[-1]}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ended", default="10000,50000", help="history sizes, comma-separated, ascending")
    parser.add_argument("--no-checkpoint", action="store_true", help="checkpoints off: recovery reads all history")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.ended.split(",")]
    rows = measure(sizes, checkpoint=not args.no_checkpoint)
    print(f"# state recovery, {platform.node()}, {datetime.now().isoformat(timespec='seconds')}")
    head = ("ended runs", "records", "ckpt", "start", "runs", "read", "recovery s", "start s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (10, 9, 5, 12, 6, 8, 10, 8), strict=True)))
    for r in rows:
        print(
            f"{r['ended_runs']:>10} {r['changelog_records']:>9} {r['checkpoint']!s:>5} {r['start']:>12}"
            f" {r['runs_loaded']:>6} {r['records_read']:>8} {r['recovery_s']:>10} {r['start_s']:>8}"
        )
    for r in rows:
        print(json.dumps({"bench": "state_recovery", **r}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
