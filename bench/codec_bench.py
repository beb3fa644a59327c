"""Microbenchmark of the Avro codec: encode and decode of three events every run produces many times.

Each decode is timed three ways: validated (an event from outside), trusted (verified as written by one
of our own components, built with ``model_construct``), and fastavro's plain dict (the floor).

Each event is built the way the runtime builds it (a demo request, an enrichment result with the
sandbox's company profile, a mid-run snapshot), then encoded and decoded in a tight loop timed with
``time.perf_counter``. The iteration count is calibrated so each measurement lasts about
``--seconds``, which keeps timer overhead and scheduler noise small without a fixed count.

    .venv/bin/python bench/codec_bench.py [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import fastavro
from pydantic import BaseModel
from streamagent.processors.workflow import project_key
from streamagent.tools.sandbox.apis import company_profile

from streamagent import codec
from streamagent.console.demo import sample_requests
from streamagent.events import (
    OnboardingRequest,
    RunRequested,
    RunStatus,
    StateSnapshot,
    StepState,
    StepStatus,
    ToolResult,
    ToolStatus,
    new_id,
    now,
    stable_id,
)


@dataclass(frozen=True)
class Timing:
    ops_per_s: float
    us_per_op: float
    iterations: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Encode/decode speed and size of RunRequested, ToolResult, StateSnapshot."
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="target duration of each measurement (default 1.5)")
    return parser.parse_args(argv)


# -- realistic events ---------------------------------------------------------------------------------


def run_requested() -> RunRequested:
    request = sample_requests(1, requested_by="crm-sync")[0]
    return request.model_copy(update={"labels": {"plan": "enterprise", "region": "eu-west-1"}})


def tool_result(request: RunRequested) -> ToolResult:
    cid = stable_id(request.run_id, "enrich", "execute")
    return ToolResult(
        event_id=stable_id(cid, "result"),
        run_id=request.run_id,
        causation_id=stable_id(cid, "command"),
        command_id=cid,
        tool="enrich",
        step="enrich",
        status=ToolStatus.succeeded,
        output=company_profile(request.company_domain),
        attempts=1,
        duration_ms=14,
    )


def state_snapshot(request: RunRequested) -> StateSnapshot:
    """Mid-run: enrich and jira done, email dispatched, slack pending (the snapshot's typical size)."""
    started = request.occurred_at
    key = project_key(request.company_name, request.run_id)
    steps = [
        StepState(
            name="enrich",
            status=StepStatus.succeeded,
            command_id=new_id(),
            decision_id=new_id(),
            attempts=1,
            output=company_profile(request.company_domain),
        ),
        StepState(
            name="jira",
            status=StepStatus.succeeded,
            command_id=new_id(),
            decision_id=new_id(),
            attempts=2,
            output={"id": "10042", "key": key, "url": f"https://sandbox.atlassian.net/browse/{key}"},
        ),
        StepState(name="email", status=StepStatus.dispatched, command_id=new_id(), decision_id=new_id()),
        StepState(name="slack"),
    ]
    fields = OnboardingRequest.model_fields
    return StateSnapshot(
        run_id=request.run_id,
        version=6,
        status=RunStatus.running,
        request=OnboardingRequest(**{name: getattr(request, name) for name in fields}),
        steps=steps,
        created_at=started,
        updated_at=now(),
        deadline_at=started + timedelta(seconds=600),
        last_event_id=new_id(),
    )


# -- timing -------------------------------------------------------------------------------------------


def measure(fn: Callable[[], object], seconds: float) -> Timing:
    # Calibrate on a short run first so the timed loop has a fixed count and no clock reads inside.
    n, elapsed = 1, 0.0
    while elapsed < 0.05:
        n *= 2
        elapsed = _time_loop(fn, n)
    iterations = max(1, int(n * seconds / elapsed))
    elapsed = _time_loop(fn, iterations)
    return Timing(iterations / elapsed, elapsed / iterations * 1e6, iterations)


def _time_loop(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


def plain_dict(data: bytes) -> dict[str, object]:
    """The floor under any decode: fastavro's record, a plain dict, with no model built from it."""
    entry = codec.peek_schema(data)
    return fastavro.schemaless_reader(io.BytesIO(data[codec.HEADER_LEN :]), entry.parsed, None)  # type: ignore[return-value]


def bench_event(name: str, event: BaseModel, seconds: float) -> None:
    """Encode, then each representation a decode can give (issue 24): the validated model (events from
    outside), the model built without validation (``trusted``: verified as a core component's), and
    fastavro's plain dict (what neither costs on top)."""
    data = codec.encode(event)
    assert codec.decode(data) == event, f"{name} does not survive a round trip"
    assert codec.decode(data, trusted=True) == event, f"{name}: the trusted decode differs"
    enc = measure(lambda: codec.encode(event), seconds)
    full = measure(lambda: codec.decode(data), seconds)
    built = measure(lambda: codec.decode(data, trusted=True), seconds)
    plain = measure(lambda: plain_dict(data), seconds)
    print(
        f"{name:<14} {len(data):>5} B   encode {enc.us_per_op:>6.1f}   decode validated {full.us_per_op:>6.1f}"
        f"   trusted {built.us_per_op:>6.1f}   plain dict {plain.us_per_op:>6.1f}   µs/op"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"machine: nproc {len(os.sched_getaffinity(0))}, python {platform.python_version()}")
    codec.registry()  # parse every schema once, outside the timed loops
    request = run_requested()
    events: list[tuple[str, BaseModel]] = [
        ("RunRequested", request),
        ("ToolResult", tool_result(request)),
        ("StateSnapshot", state_snapshot(request)),
    ]
    for name, event in events:
        bench_event(name, event, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
