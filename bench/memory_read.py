"""What reading shared memory costs a decision, and how soon a decision sees a change.

1. ``read``: CPU per decision of the rules decider on a step that reads three entities from the memory
   table, against the same step reading none (in-process, the table filled with real decoded versions).
   The difference is what memory costs each decision: three reference renders, three dict lookups
   under the table's lock, the arguments built from the fields, the versions and the context recorded.
2. ``visible`` (``--e2e``): on the embedded stack, the time from an entity update's acknowledgement by
   the broker (produced straight to the intake topic for memory) to the moment a ``MemoryTable`` in this
   process (as the decision processor keeps one) holds the new version: intake, the memory processor's
   freshness wait and apply, and one fetch. p50/p99 over ``--updates`` updates, one at a time, after five
   warm-up updates (the first ones also wait for the groups to form on a fresh stack).

    .venv/bin/python bench/memory_read.py              # the read cost only
    .venv/bin/python bench/memory_read.py --e2e        # and the update-to-visible latency

A human table, then one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.state.fold import apply
from streamagent.processors.workflow import load_workflow

from streamagent import codec
from streamagent.config import Settings
from streamagent.events import EntityVersion, RunRequested
from streamagent.memory import MemoryTable

WORKFLOW = """
name = "{name}"
goal = "bench"
tools = ["email"]

[[steps]]
name = "email"
tool = "email"
{reads}
args.to = "{to}"
args.subject = "{subject}"
args.body = "{body}"
"""
READS = (
    'reads = ["contact:{request.company_domain}", "company:{request.company_domain}", "prefs:{request.company_domain}"]'
)


def _workflow(tmp: Path, name: str, with_reads: bool):  # type: ignore[no-untyped-def]
    text = WORKFLOW.format(
        name=name,
        reads=READS if with_reads else "",
        to="{memory.contact.email | or: request.contact_email}" if with_reads else "{request.contact_email}",
        subject="Welcome {memory.company.name | or: request.company_name}"
        if with_reads
        else "Welcome {request.company_name}",
        body="Plan {memory.prefs.plan | default: basic}" if with_reads else "Plan basic",
    )
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return load_workflow(path)


def read_cost(decisions: int) -> dict[str, float]:
    table = MemoryTable(Settings())
    for entity, fields in (
        ("contact", {"email": "a@acme.io"}),
        ("company", {"name": "Acme"}),
        ("prefs", {"plan": "pro"}),
    ):
        version = EntityVersion(
            entity=entity,
            key="acme.io",
            version=3,
            fields=fields,
            as_of=datetime.now(UTC),
            writer="bench",
            write_id="w",
        )
        table._apply(f"{entity}/acme.io".encode(), codec.encode(version))
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, with_reads in (("none", False), ("three", True)):
            workflow = _workflow(Path(tmp), f"bench-{label}", with_reads)
            request = RunRequested(
                run_id="r-1",
                company_name="Acme",
                company_domain="acme.io",
                contact_name="Ada",
                contact_email="ada@acme.io",
                requested_by="bench",
                workflow=workflow.name,
            )
            snapshot = apply(None, request, 3600, workflow).state.snapshot
            decider = RulesDecider(workflow, memory=table.current)
            decided = decider.decide(snapshot)
            assert decided is not None and decided.action.value == "dispatch"
            if with_reads:
                assert decided.arguments["to"] == "a@acme.io" and len(decided.memory) == 3
            for _ in range(200):
                decider.decide(snapshot)
            started = time.process_time()
            for _ in range(decisions):
                decider.decide(snapshot)
            figures[label] = (time.process_time() - started) / decisions * 1000
    return figures


def visible_latency(updates: int) -> list[float]:
    from confluent_kafka import Producer

    from streamagent.console.devstack.stack import Stack
    from streamagent.events import MemoryWrite
    from streamagent.topics import MEMORY_REQUESTS

    with tempfile.TemporaryDirectory() as tmp, Stack(Settings(data_dir=Path(tmp) / "data")) as stack:
        s = stack.settings
        table = MemoryTable(s, "bench-memory").start()
        producer = Producer({"bootstrap.servers": s.bootstrap_servers})
        seen: list[float] = []
        warm_up = 5  # the first updates also wait for intake and the memory processor to join their groups
        try:
            for i in range(updates + warm_up):
                write = MemoryWrite(entity="contact", key="bench.io", set={"n": i}, writer="bench")
                acked: list[float] = []
                producer.produce(
                    s.topic(MEMORY_REQUESTS),
                    value=codec.encode(write),
                    on_delivery=lambda _err, _m, acked=acked: acked.append(time.monotonic()),
                )
                producer.flush(10)
                deadline = time.monotonic() + 30
                while (found := table.get("contact", "bench.io")) is None or found.fields.get("n") != i:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"update {i} not visible within 30 s")
                    time.sleep(0.001)  # polling the local table, as a benchmark's clock
                if i >= warm_up:
                    seen.append((time.monotonic() - acked[0]) * 1000)
        finally:
            table.stop()
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--e2e", action="store_true", help="also measure update-to-visible on the embedded stack")
    parser.add_argument("--updates", type=int, default=100)
    args = parser.parse_args(argv)
    date = datetime.now(UTC).date().isoformat()
    cost = read_cost(args.decisions)
    rows = [
        {
            "bench": "memory_read",
            "figure": "cpu_ms_per_decision",
            "reads_none": round(cost["none"], 4),
            "reads_three": round(cost["three"], 4),
            "memory_ms_per_decision": round(cost["three"] - cost["none"], 4),
            "decisions": args.decisions,
            "date": date,
            "python": platform.python_version(),
        }
    ]
    if args.e2e:
        seen = sorted(visible_latency(args.updates))
        rows.append(
            {
                "bench": "memory_read",
                "figure": "update_to_visible_ms",
                "p50": round(statistics.median(seen), 1),
                "p99": round(seen[min(len(seen) - 1, int(len(seen) * 0.99))], 1),
                "max": round(seen[-1], 1),
                "updates": len(seen),
                "date": date,
            }
        )
    print(f"{'figure':<26} {'value':>40}")
    for row in rows:
        shown = {k: v for k, v in row.items() if k not in ("bench", "figure", "date", "python")}
        print(f"{row['figure']:<26} {json.dumps(shown):>40}")
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
