"""Tables the command line prints, shared by ``runs`` and the demo."""

from __future__ import annotations

from typing import Any


def print_runs_table(rows: list[Any]) -> None:
    print(f"{'run id':<36}  {'company':<24} {'status':<10} {'steps':>5} {'duration':>9}")
    for r in rows:
        duration = f"{r.duration_s:.2f}s" if r.duration_s is not None else "-"
        print(f"{r.run_id:<36}  {(r.company_name or '?')[:24]:<24} {r.status:<10} {r.steps_done:>3}/4 {duration:>9}")
