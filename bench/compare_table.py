"""One table from the logs of ``bench/compare.sh``: streamagent's load.py and the peers' run.sh.

    .venv/bin/python bench/compare_table.py LOG [LOG ...]

Reads every line that is pure JSON with a ``burst`` key (``bench/load.py``) and every line starting
``PEER `` (``../shared/peers/run.sh``), then prints, per workload, streamagent's row and each peer's row
with the ratios streamagent / peer. Exit status 1 if a log has no result or a peer reported an error.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FOREIGN_PCT = 10.0  # load.py's foreign_cpu_pct above this: something else ran during the burst


@dataclass(frozen=True)
class Row:
    system: str
    workload: str  # "w1" | "w2"
    conc: str
    runs: int | None
    runs_per_s: float | None
    cpu_ms_per_run: float | None
    makespan_s: float | None
    note: str = ""


def parse(lines: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for line in lines:
        line = line.strip()
        if line.startswith("PEER "):
            r = json.loads(line[len("PEER ") :])
            if "error" in r:
                rows.append(Row(r["peer"], r["workload"], "-", None, None, None, None, r["error"]))
                continue
            errors = r.get("errors", 0)
            rows.append(
                Row(
                    r["peer"],
                    r["workload"],
                    str(r["conc"]),
                    r["runs"],
                    r["runs_per_s"],
                    r["cpu_ms_per_run"],
                    r["makespan_s"],
                    f"{errors} errors" if errors else "",
                )
            )
        elif line.startswith("{"):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict) or "burst" not in r:
                continue
            incomplete = r["burst"] - r["completed"]
            notes = [f"{incomplete} runs not completed" if incomplete else ""]
            foreign = r.get("foreign_cpu_pct")
            if foreign is not None and foreign > FOREIGN_PCT:
                notes.append(f"foreign CPU {foreign:.0f}% of a core: figures low")
            rows.append(
                Row(
                    "streamagent",
                    r.get("mode", "w1"),
                    "all at once",
                    r["burst"],
                    r["runs_per_s"],
                    r["cpu_ms_per_run"],
                    r["makespan_s"],
                    "; ".join(filter(None, notes)),
                )
            )
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


def table(rows: list[Row]) -> list[str]:
    head = (
        f"{'system':<12} {'load':<4} {'conc':>11} {'runs':>5} {'runs/s':>7} {'cpu ms/run':>10} {'makespan s':>10}"
        f" | {'runs/s ratio':>12} {'cpu ratio':>9} {'makespan ratio':>14}  note"
    )
    out = [head, "-" * len(head)]
    for workload in ("w1", "w2"):
        ours = [r for r in rows if r.workload == workload and r.system == "streamagent"]
        peers = [r for r in rows if r.workload == workload and r.system != "streamagent"]
        peers.sort(key=lambda r: (r.system != "dbos", r.system, int(r.conc) if r.conc.isdigit() else 0))
        base = ours[-1] if ours else None  # the last (largest) burst if load.py printed several
        for r in [*ours, *peers]:
            cells = ["", "", ""]
            note = r.note
            if r.system != "streamagent" and base is not None:
                cells = [
                    ratio(base.runs_per_s, r.runs_per_s),
                    ratio(base.cpu_ms_per_run, r.cpu_ms_per_run),
                    ratio(base.makespan_s, r.makespan_s),
                ]
                if base.runs != r.runs and r.runs is not None:
                    note = "; ".join(filter(None, [note, f"makespan ratio compares {base.runs} vs {r.runs} runs"]))
            out.append(
                f"{r.system:<12} {workload.upper():<4} {r.conc:>11} {r.runs if r.runs is not None else '-':>5}"
                f" {fmt(r.runs_per_s):>7} {fmt(r.cpu_ms_per_run, 2):>10} {fmt(r.makespan_s, 2):>10}"
                f" | {cells[0]:>12} {cells[1]:>9} {cells[2]:>14}  {note}".rstrip()
            )
    out.append(
        "ratios are streamagent / peer: runs/s above 1x = streamagent faster; cpu and makespan above 1x ="
        " streamagent costlier / slower"
    )
    out.append(
        "cpu ms/run: streamagent = broker + PostgreSQL + processors + tools (sandbox excluded);"
        " peers = client + PostgreSQL"
    )
    return out


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rows: list[Row] = []
    missing = []
    for path in argv:
        found = parse(Path(path).read_text(errors="replace").splitlines())
        if not found:
            missing.append(path)
        rows += found
    print("\n".join(table(rows)))
    for path in missing:
        print(f"no result in {path}", file=sys.stderr)
    failed = missing or any(r.runs_per_s is None for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
