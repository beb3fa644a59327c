"""Decision overhead: the runtime's own cost per model decision, with a model that answers at once.

For each decider (``rules``, then ``llm``) the script starts the embedded stack in a fresh temporary
data dir, completes one warm-up run, submits ``--runs`` onboarding requests at once and waits for every
run to end. With ``llm`` the fake OpenAI-compatible model (``python -m streamagent.tools.sandbox.model``)
runs in its own process and answers every call at once with the workflow's next step, so what the
``llm`` row adds over the ``rules`` row is the runtime's own work per model decision: preparing the
context, the HTTP round trip through the ``openai`` client, validating the answer, and the larger
recorded decision (messages and answers are stored with it).

    .venv/bin/python bench/decision_overhead.py --runs 100

Figures per decider, for the benchmarked runs only (the warm-up is excluded):

- ``decisions``: recorded decisions of those runs; ``decisions_per_s`` over the span between their
  first and last ``DecisionRecorded`` (event time from the projection). The whole pipeline paces it,
  not the decision processor alone.
- ``cpu_ms_per_decision``: CPU (user + system, from ``/proc/<pid>/stat``) of the decision processor's
  OS process over the burst ÷ decisions. Includes its idle polling during the burst.
- ``decide_p50_ms`` / ``decide_p99_ms``: ToolResult → the DecisionRecorded it caused (state processor +
  decision processor; the model's own time is ~0 here).
- ``model_calls``: calls the fake model counted during the burst (its ``GET /_fake/stats``), and
  ``calls_match``: whether they equal the decisions the model made (one call per decision).

A human table first, then one line of pure JSON per decider (``grep '^{'`` collects them). Exit 0 when
every run completed and every model decision cost exactly one call.

With ``--endpoint URL`` (and ``--model NAME``) the ``llm`` row asks a real OpenAI-compatible endpoint
instead of the fake (e.g. the local model ``make llm-local-bench`` serves): what the row then shows is
the end-to-end latency of one step with that model. The endpoint counts no calls for us, so
``model_calls`` is the calls the decisions recorded; a weak model's fallbacks are counted, not failed.
The other model settings (answer style, timeouts) come from the environment as for any process.

- ``step_p50_ms`` / ``step_p99_ms``: one step end to end, ToolCommand → ToolResult → the
  DecisionRecorded of the next step (tool, fold, the model's decision, recording it).
- ``model_latency_p50_ms`` / ``_p99_ms``: the model calls' own time per decision (the decision's
  recorded ``latency_ms``, the repair turn included); ``prompt_tokens_p50`` / ``completion_tokens_p50``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from streamagent import codec, db
from streamagent.config import Settings, get_settings
from streamagent.console.demo import sample_requests, wait_for_runs
from streamagent.console.devstack.embedded import free_port
from streamagent.console.devstack.stack import Stack
from streamagent.events import DecisionRecorded
from streamagent.submit import produce_requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_throughput import hop_latencies, load_events, percentile, warm_up  # a sibling script, not a package

CLK_TCK = os.sysconf("SC_CLK_TCK")
DECISION = "processor-decision"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The runtime's own cost per model decision (fake model, instant).")
    parser.add_argument("--runs", type=int, default=100, help="onboarding runs per decider, submitted at once")
    parser.add_argument("--deciders", default="rules,llm", help="comma-separated, in order (default rules,llm)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the runs of one decider")
    parser.add_argument("--warmup-timeout", type=float, default=120.0, help="seconds the warm-up run may take")
    parser.add_argument("--endpoint", default="", help="an OpenAI-compatible base URL for the llm row (default: fake)")
    parser.add_argument("--model", default="fake-model", help="model name sent to --endpoint")
    args = parser.parse_args(argv)
    args.deciders = [d.strip() for d in args.deciders.split(",") if d.strip()]
    if args.runs < 1 or not set(args.deciders) <= {"rules", "llm"}:
        parser.error("--runs must be positive and --deciders a list of rules, llm")
    return args


def cpu_ticks(pid: int | None) -> int | None:
    """utime + stime of one process, in clock ticks; None once it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # the command name may hold spaces: split after ')'
    return int(fields[11]) + int(fields[12])


class FakeModelProcess:
    """The fake model in its own OS process, as a real endpoint would be: its CPU is not the runtime's."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamagent.tools.sandbox.model", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while self.calls() is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the fake model did not start")
            time.sleep(0.05)  # readiness probe interval

    def calls(self) -> int | None:
        try:
            return int(httpx.get(f"http://127.0.0.1:{self.port}/_fake/stats", timeout=2).json()["calls"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def recorded(settings: Settings, run_ids: list[str]) -> list[DecisionRecorded]:
    with db.connect(settings) as conn:
        rows = conn.execute("SELECT decision_event FROM decisions WHERE run_id = ANY(%s)", (run_ids,)).fetchall()
    out = [codec.decode(bytes(row[0])) for row in rows]
    return [d for d in out if isinstance(d, DecisionRecorded)]


def measure(args: argparse.Namespace, decider: str, data_dir: Path) -> dict[str, object]:
    model = FakeModelProcess() if decider == "llm" and not args.endpoint else None
    try:
        # Free ports: a benchmark must not take (or be refused) the addresses of a `up` running on this machine.
        update: dict[str, object] = {"data_dir": data_dir, "decider": decider, "broker_port": 0, "sandbox_port": 0}
        if model is not None:
            update.update(openai_base_url=model.url, model="fake-model")
        elif decider == "llm":
            update.update(openai_base_url=args.endpoint, model=args.model)
        # The environment's settings (answer style, timeouts, ...), as every process of the stack reads them.
        with Stack(get_settings().model_copy(update=update)) as stack:
            s = stack.settings
            if warm_up(s, args.warmup_timeout) is None:
                raise RuntimeError(f"the warm-up run did not end within {args.warmup_timeout:.0f} s")
            pid = stack.children[DECISION].pid
            calls_before = model.calls() if model is not None else 0
            model_cpu_before = cpu_ticks(model.proc.pid) if model is not None else None
            cpu_before = cpu_ticks(pid)
            started = time.monotonic()
            run_ids = produce_requests(s, sample_requests(args.runs, requested_by="bench"))
            rows = wait_for_runs(s, run_ids, args.timeout)
            wall = time.monotonic() - started
            cpu_after = cpu_ticks(stack.children[DECISION].pid if stack.children[DECISION].pid == pid else None)
            calls_after = model.calls() if model is not None else 0
            model_cpu_after = cpu_ticks(model.proc.pid) if model is not None else None
            decisions = recorded(s, run_ids)
            events = load_events(s, run_ids)
    finally:
        if model is not None:
            model.stop()
    decided = [e.occurred_at for e in events if e.type == "DecisionRecorded"]
    span = (max(decided) - min(decided)).total_seconds() if len(decided) > 1 else float("nan")
    by_model = [d for d in decisions if d.context.get("messages")]
    recorded_calls = sum(int(d.context.get("model_calls") or 0) for d in by_model)
    # A real endpoint counts nothing for us: its calls are those the decisions recorded.
    calls = (calls_after or 0) - (calls_before or 0) if model is not None or decider == "rules" else recorded_calls
    decide, _tool, _unmatched = hop_latencies(events)
    steps = step_latencies(events)
    model_ms = [float(d.context.get("latency_ms") or 0) / 1000 for d in by_model]
    cpu_ms = (cpu_after - cpu_before) * 1000 / CLK_TCK if cpu_before is not None and cpu_after is not None else None
    model_cpu_ms = (
        (model_cpu_after - model_cpu_before) * 1000 / CLK_TCK
        if model_cpu_before is not None and model_cpu_after is not None
        else None
    )
    return {
        "bench": "decision_overhead",
        "decider": decider,
        "runs": args.runs,
        "completed": sum(1 for r in rows if r.status == "completed"),
        "decisions": len(decisions),
        "model_decisions": len(by_model),
        "fallbacks": sum(1 for d in decisions if d.context.get("fallback")),
        "model_calls": calls,
        "calls_match": calls == len(by_model),
        "decisions_per_s": round(len(decisions) / span, 1) if span > 0 else None,
        "wall_s": round(wall, 2),
        "cpu_ms": None if cpu_ms is None else round(cpu_ms, 1),
        "cpu_ms_per_decision": None if cpu_ms is None or not decisions else round(cpu_ms / len(decisions), 3),
        "decide_p50_ms": round(percentile(decide, 0.5) * 1000, 1),
        "decide_p99_ms": round(percentile(decide, 0.99) * 1000, 1),
        "step_p50_ms": round(percentile(steps, 0.5) * 1000, 1),
        "step_p99_ms": round(percentile(steps, 0.99) * 1000, 1),
        "model_latency_p50_ms": round(percentile(model_ms, 0.5) * 1000, 1) if model_ms else None,
        "model_latency_p99_ms": round(percentile(model_ms, 0.99) * 1000, 1) if model_ms else None,
        "prompt_tokens_p50": percentile([float(d.prompt_tokens) for d in by_model], 0.5) if by_model else None,
        "completion_tokens_p50": percentile([float(d.completion_tokens) for d in by_model], 0.5) if by_model else None,
        "refused": sum(len(d.context.get("refused") or []) for d in by_model),
        "endpoint": args.endpoint if decider == "llm" and args.endpoint else None,
        "model": (args.model if args.endpoint else "fake-model") if decider == "llm" else None,
        "fake_model_cpu_ms_per_call": None if model_cpu_ms is None or not calls else round(model_cpu_ms / calls, 3),
        "restarted": cpu_after is None,  # the decision processor died during the burst: CPU not measured
        "load_avg_after": round(os.getloadavg()[0], 2),  # other work on the machine makes every figure worse
    }


def step_latencies(events: list[Any]) -> list[float]:
    """One step end to end: a ToolCommand → its ToolResult → the DecisionRecorded that result caused."""
    by_id = {e.event_id: e for e in events}
    decision_for = {e.causation_id: e for e in events if e.type == "DecisionRecorded" and e.causation_id}
    out = []
    for result in (e for e in events if e.type == "ToolResult"):
        command, decision = by_id.get(result.causation_id or ""), decision_for.get(result.event_id)
        if command is not None and command.type == "ToolCommand" and decision is not None:
            out.append((decision.occurred_at - command.occurred_at).total_seconds())
    return out


def print_table(results: list[dict[str, object]]) -> None:
    print()
    head = (
        f"{'decider':<8}{'runs':>6}{'done':>6}{'decisions':>11}{'dec/s':>8}{'cpu ms/dec':>12}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'model calls':>13}{'= decisions':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['decider']!s:<8}{r['runs']!s:>6}{r['completed']!s:>6}{r['decisions']!s:>11}"
            f"{r['decisions_per_s']!s:>8}{r['cpu_ms_per_decision']!s:>12}{r['decide_p50_ms']!s:>8}"
            f"{r['decide_p99_ms']!s:>8}{r['model_calls']!s:>13}{('yes' if r['calls_match'] else 'NO'):>13}"
        )
    base = next((r for r in results if r["decider"] == "rules"), None)
    llm = next((r for r in results if r["decider"] == "llm"), None)
    per = [r["cpu_ms_per_decision"] if r else None for r in (base, llm)]
    if isinstance(per[0], float) and isinstance(per[1], float):
        extra = per[1] - per[0]
        print(f"\nthe model path costs the decision processor {extra:+.2f} ms CPU per decision over the rules")
    if any(r.get("endpoint") for r in results):
        print()
        for r in results:
            print(
                f"{r['decider']!s:<8} step p50 {r['step_p50_ms']} ms / p99 {r['step_p99_ms']} ms;"
                f" model p50 {r['model_latency_p50_ms']} ms / p99 {r['model_latency_p99_ms']} ms;"
                f" tokens p50 {r['prompt_tokens_p50']}+{r['completion_tokens_p50']};"
                f" {r['refused']} refused, {r['fallbacks']} fallback(s) of {r['model_decisions']} model decisions"
            )
    print()
    for r in results:
        print(json.dumps(r))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nproc = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: nproc {nproc}, python {platform.python_version()}, load average {load}")
    results = []
    for decider in args.deciders:
        with tempfile.TemporaryDirectory(prefix=f"streamagent-bench-decision-{decider}-") as tmp:
            print(f"{decider}: stack up, warm-up run, then {args.runs} runs at once…", flush=True)
            results.append(measure(args, decider, Path(tmp)))
    print_table(results)
    # A real model may answer badly (fallbacks) and counts no calls for us: only the fake is held to both.
    ok = all(
        r["completed"] == r["runs"]
        and not r["restarted"]
        and (r.get("endpoint") is not None or (r["calls_match"] and not r["fallbacks"]))
        for r in results
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
