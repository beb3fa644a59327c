"""Prometheus metrics shared by every process, and the per-process endpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

EVENTS_PROCESSED = Counter(
    "streamagent_events_processed_total", "Events handled by a processor", ["processor", "topic"]
)
DEAD_LETTERS = Counter(
    "streamagent_dead_letters_total", "Messages sent to the dead-letter topic", ["processor", "reason"]
)
TOOL_CALLS = Counter(
    "streamagent_tool_calls_total",
    "Tool command outcomes (succeeded|failed|retried|deduplicated|throttled: a call waited for the rate limit)",
    ["tool", "outcome"],
)
TOOL_CALL_SECONDS = Histogram("streamagent_tool_call_seconds", "Duration of one external call", ["tool"])
CIRCUIT_STATE = Gauge("streamagent_circuit_state", "0 closed, 1 half-open, 2 open", ["tool"])
RUNS = Counter("streamagent_runs_total", "Runs that reached a status", ["status"])
REDRIVES = Counter(
    "streamagent_redrives_total", "Commands found lost (consumed past, no result): re-sent or given up", ["outcome"]
)
RESENT_COMMANDS = Counter("streamagent_resent_commands_total", "Commands produced again (re-drive or replay)", ["tool"])
INTAKE_REQUESTS = Counter(
    "streamagent_intake_requests_total", "Upstream requests read by intake, by outcome", ["outcome"]
)
SNAPSHOTS = Counter("streamagent_snapshots_total", "Snapshots published for the decision layer")
SKIPPED_RECORDS = Counter(
    "streamagent_state_skipped_records_total",
    "Records faust skipped (around a rebalance) that the state processor read from the broker itself",
)
RUNS_ADMITTED = Gauge("streamagent_runs_admitted", "Runs in flight on this state worker (admitted, not yet over)")
RUNS_WAITING = Gauge("streamagent_runs_waiting", "Requested runs waiting for room under max_running_runs")
DECISIONS = Counter(
    "streamagent_decisions_total",
    "Decisions by outcome (recorded|replayed|superseded|waiting)",
    ["decider", "outcome"],
)
GUARD_OUTCOMES = Counter(
    "streamagent_guard_outcomes_total", "The guard's verdicts on decisions (allowed|approval|refused)", ["outcome"]
)
# One per HTTP request to the model (each retry counts): with the decisions counter it shows that a
# redelivered snapshot costs no call. Outcomes: answered | error (429, 5xx, timeout, connection) | refused (other 4xx).
MODEL_CALLS = Counter("streamagent_model_calls_total", "Model calls by outcome", ["decider", "outcome"])
DEPENDENCY_UP = Gauge(
    "streamagent_dependency_up",
    "1 while a process reaches a dependency (postgres|kafka|sandbox), 0 during an outage",
    ["process", "dependency"],
)
OUTAGE_RETRIES = Counter(
    "streamagent_outage_retries_total",
    "Work retried because a dependency was down (never dead-lettered)",
    ["process", "dependency"],
)

# -- flow: lag and latency -------------------------------------------------------------------------------
# From librdkafka's statistics (confluent consumers, every ``consumer_lag_interval_s``) and from the state
# processor's own fold position against faust's high-water marks: no extra broker round trip either way.
CONSUMER_LAG = Gauge(
    "streamagent_consumer_lag",
    "Messages of a partition its consumer group has not committed yet (high watermark - committed offset)",
    ["group", "topic", "partition"],
)
# Seconds, from the producer's occurred_at (a snapshot's updated_at) to its consumption: one hop of the
# loop (request -> state, snapshot -> decision, command -> tool, result -> state). Clocks of different
# hosts skew it; the buckets start at 5 ms, which is what one hop costs on one host.
HOP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
HOP_SECONDS = Histogram(
    "streamagent_hop_seconds", "Event age when a processor consumed it", ["processor", "topic"], buckets=HOP_BUCKETS
)
STEP_SECONDS = Histogram(
    "streamagent_step_seconds",
    "A step from its command's dispatch to its result folded into the run (retries and queueing included)",
    ["step", "status"],
    buckets=HOP_BUCKETS,
)
RUN_SECONDS = Histogram(
    "streamagent_run_seconds",
    "A run from its request to its terminal status",
    ["status"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
)
RUN_OLDEST_SECONDS = Gauge(
    "streamagent_run_oldest_age_seconds", "Age of the oldest run in flight on this state worker (0: none)"
)

# -- tools ----------------------------------------------------------------------------------------------
TOOL_ATTEMPTS = Histogram(
    "streamagent_tool_call_attempts",
    "Attempts a command took to its final result (succeeded or failed)",
    ["tool"],
    buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20),
)
TOOL_IN_FLIGHT = Gauge(
    "streamagent_tool_in_flight", "Commands this tool process has accepted and not finished", ["tool"]
)

# -- decisions and the model ------------------------------------------------------------------------------
DECISION_ACTIONS = Counter(
    "streamagent_decision_actions_total",
    "Recorded decisions by kind (dispatch|complete|fail|escalate|compensate|wait) and the decider that made them",
    ["decider", "action"],
)
MODEL_TOKENS = Counter(
    "streamagent_model_tokens_total", "Model tokens of recorded decisions (prompt|completion)", ["decider", "kind"]
)
MODEL_COST = Counter("streamagent_model_cost_usd_total", "Model cost of recorded decisions, in US dollars", ["decider"])
MODEL_CALL_SECONDS = Histogram(
    "streamagent_model_call_seconds",
    "One model request, answered or not",
    ["decider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
)


def decision_recorded(record: Any) -> None:
    """Count one newly recorded decision (a ``DecisionRecorded``), never a replayed one: its tokens
    were spent, and counted, once."""
    DECISION_ACTIONS.labels(record.decider, record.action.value).inc()
    if record.prompt_tokens:
        MODEL_TOKENS.labels(record.decider, "prompt").inc(record.prompt_tokens)
    if record.completion_tokens:
        MODEL_TOKENS.labels(record.decider, "completion").inc(record.completion_tokens)
    if record.cost_usd:
        MODEL_COST.labels(record.decider).inc(record.cost_usd)


class HopTimer:
    """``streamagent_hop_seconds`` of one processor, with a child per topic kept at hand: one dict
    lookup and one observe per message on the hot path."""

    def __init__(self, processor: str) -> None:
        self.processor = processor
        self._children: dict[str, Any] = {}

    def observe(self, topic: str, event: Any, now: float | None = None) -> None:
        at = getattr(event, "occurred_at", None) or getattr(event, "updated_at", None)
        if at is None:
            return
        child = self._children.get(topic)
        if child is None:
            child = self._children[topic] = HOP_SECONDS.labels(self.processor, topic)
        child.observe(max(0.0, (time.time() if now is None else now) - at.timestamp()))


class LagFromStatistics:
    """``stats_cb`` of a confluent consumer: librdkafka sends its statistics every
    ``statistics.interval.ms`` from the consumer's own poll, with per-partition ``consumer_lag``
    (high watermark, or last stable offset under read_committed, minus the committed offset). Only
    partitions this consumer fetches are reported; a partition given away stops being reported here
    (its new owner reports it), so two processes never both show it."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._shown: set[tuple[str, str]] = set()

    def __call__(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        shown: set[tuple[str, str]] = set()
        for topic, info in (stats.get("topics") or {}).items():
            for partition, p in (info.get("partitions") or {}).items():
                if partition == "-1" or p.get("fetch_state") in (None, "none", "stopped"):
                    continue
                lag = p.get("consumer_lag", -1)
                if lag is None or lag < 0:
                    # Nothing committed yet by this group: how far the consumer is from the end.
                    hi, position = p.get("hi_offset", -1), p.get("app_offset", -1)
                    if hi is None or hi < 0 or position is None or position < 0:
                        continue
                    lag = hi - position
                CONSUMER_LAG.labels(self.group, topic, partition).set(max(0, lag))
                shown.add((topic, partition))
        for topic, partition in self._shown - shown:
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(self.group, topic, partition)
        self._shown = shown


def set_lag(group: str, lags: dict[tuple[str, int], int], shown: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Set ``streamagent_consumer_lag`` for a consumer that computes its own (the faust state
    processor); partitions in ``shown`` and not in ``lags`` are removed. Returns what is shown now."""
    for (topic, partition), lag in lags.items():
        CONSUMER_LAG.labels(group, topic, str(partition)).set(max(0, lag))
    for topic, partition in shown - set(lags):
        with contextlib.suppress(KeyError):
            CONSUMER_LAG.remove(group, topic, str(partition))
    return set(lags)


class DependencyHealth:
    """What one process knows of its dependencies: up or down, since when. Logs once per change of
    state (not once per retry), and keeps ``streamagent_dependency_up`` current. Thread-safe."""

    def __init__(self, process: str, dependencies: Iterable[str] = ()) -> None:
        self.process = process
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()
        for dependency in dependencies:  # known up until shown otherwise, so dashboards see 1, not nothing
            DEPENDENCY_UP.labels(process, dependency).set(1)

    def down(self, dependency: str, error: BaseException | str) -> None:
        OUTAGE_RETRIES.labels(self.process, dependency).inc()
        with self._lock:
            if dependency in self._down:
                return
            self._down[dependency] = time.monotonic()
        DEPENDENCY_UP.labels(self.process, dependency).set(0)
        log.warning(
            "%s unavailable, retrying until it is back: %s",
            dependency,
            error if isinstance(error, str) else repr(error),
            extra={"processor": self.process, "dependency": dependency, "dependency_up": False},
        )

    def up(self, dependency: str) -> None:
        with self._lock:
            since = self._down.pop(dependency, None)
        DEPENDENCY_UP.labels(self.process, dependency).set(1)
        if since is not None:
            log.warning(
                "%s is back after %.1fs",
                dependency,
                time.monotonic() - since,
                extra={"processor": self.process, "dependency": dependency, "dependency_up": True},
            )

    def is_down(self, dependency: str) -> bool:
        return dependency in self._down

    def all_up(self) -> None:
        for dependency in self.degraded():
            self.up(dependency)

    def degraded(self) -> list[str]:
        """Dependencies currently down (empty: healthy)."""
        with self._lock:
            return sorted(self._down)


def degraded() -> dict[str, list[str]]:
    """Dependencies this process reports down (``streamagent_dependency_up`` == 0), per process label."""
    down: dict[str, list[str]] = {}
    for family in DEPENDENCY_UP.collect():
        for sample in family.samples:
            if sample.value == 0:
                down.setdefault(sample.labels["process"], []).append(sample.labels["dependency"])
    return down


def _app() -> Callable[..., Iterable[bytes]]:
    """The metrics endpoint, plus ``/health``: 200 with ``{"status": "ok"}``, or ``{"status":
    "degraded", "down": {process: [dependency, ...]}}`` while a dependency is out. Degraded is still
    200: the process is alive and waiting the outage out, and restarting it would not help."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in ("/health", "/healthz"):
            down = degraded()
            body = json.dumps({"status": "degraded" if down else "ok", "down": down}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(port: int, name: str, port_dir: Path | None = None) -> int:
    """Start the metrics and health endpoint; port 0 asks the OS for a free one.

    The bound port is also written to ``port_dir/<name>.port`` so that operators (and tests) can
    find the endpoint of a process whose port the OS chose.
    """
    server = make_server("127.0.0.1" if port == 0 else "0.0.0.0", port, _app(), ThreadingWSGIServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    bound = int(server.server_address[1])
    if port_dir is not None:
        port_dir.mkdir(parents=True, exist_ok=True)
        (port_dir / f"{name}.port").write_text(str(bound))
    log.info("metrics endpoint up", extra={"metrics_port": bound})
    return bound


def health(port: int) -> dict[str, Any]:
    """Read a process's ``/health`` (tests and the CLI)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return dict(json.loads(response.read()))


def scrape(port: int, metric: str, labels: dict[str, str] | None = None) -> float | None:
    """Read one sample from a metrics endpoint (tests and the CLI)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return None


# -- run quality (``streamagent report``), counted by the projection once per ended run --------------------
# Labelled by workflow (and status): the same figures the report prints, for dashboards and alerts. The
# projection counts a run when it first projects its end into a database, and what a late event of it
# adds (an undo after an escalation, a result on its own topic); a batch delivered again is not counted
# twice, a replay into an empty database is (these are process counters: rates survive it). Outcomes,
# durations, costs and tokens are taken at the end.
QUALITY_DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)
RUN_OUTCOMES = Counter(
    "streamagent_run_outcomes_total",
    "Runs ended, by workflow and status (completed|failed|escalated|cancelled)",
    ["workflow", "status"],
)
RUN_DURATION = Histogram(
    "streamagent_run_duration_seconds",
    "An ended run from its request to its end, by workflow and status",
    ["workflow", "status"],
    buckets=QUALITY_DURATION_BUCKETS,
)
RUN_COST = Histogram(
    "streamagent_run_cost_usd",
    "Model cost of an ended run in US dollars, by workflow and status",
    ["workflow", "status"],
    buckets=(0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
)
RUN_TOOL_CALLS = Counter(
    "streamagent_run_tool_calls_total", "Commands dispatched (steps and undos) by ended runs", ["workflow"]
)
RUN_EXCESS_TOOL_CALLS = Counter(
    "streamagent_run_excess_tool_calls_total",
    "Commands an ended run dispatched beyond its workflow's step count",
    ["workflow"],
)
RUN_RETRIES = Counter("streamagent_run_retries_total", "Tool attempts beyond the first, by ended runs", ["workflow"])
RUN_TOKENS = Counter("streamagent_run_tokens_total", "Model tokens spent by ended runs", ["workflow"])
GUARD_REFUSALS = Counter(
    "streamagent_guard_refusals_total", "Decisions the guard refused, counted when their run ends", ["workflow"]
)
APPROVALS = Counter("streamagent_approvals_total", "Approvals requested, counted when their run ends", ["workflow"])
APPROVAL_WAIT = Histogram(
    "streamagent_approval_wait_seconds",
    "From an approval's request to its grant, denial or expiry",
    ["workflow"],
    buckets=QUALITY_DURATION_BUCKETS,
)


class CountedQuality(NamedTuple):
    """What the metrics already counted of an ended run."""

    tool_calls: int
    retries: int
    guard_refusals: int
    approvals: int
    approval_waits: int


def run_changed(quality: Any, before: CountedQuality) -> None:
    """Count what a late event added to an ended run already counted (counters only go up)."""
    workflow = quality.workflow or "unknown"
    if quality.tool_calls > before.tool_calls:
        RUN_TOOL_CALLS.labels(workflow).inc(quality.tool_calls - before.tool_calls)
        if quality.workflow_steps is not None:
            excess = max(0, quality.tool_calls - quality.workflow_steps) - max(
                0, before.tool_calls - quality.workflow_steps
            )
            if excess > 0:
                RUN_EXCESS_TOOL_CALLS.labels(workflow).inc(excess)
    if quality.retries > before.retries:
        RUN_RETRIES.labels(workflow).inc(quality.retries - before.retries)
    if quality.guard_refusals > before.guard_refusals:
        GUARD_REFUSALS.labels(workflow).inc(quality.guard_refusals - before.guard_refusals)
    if quality.approvals > before.approvals:
        APPROVALS.labels(workflow).inc(quality.approvals - before.approvals)
    for wait in quality.approval_waits_s[before.approval_waits :]:
        APPROVAL_WAIT.labels(workflow).observe(max(0.0, wait))


def run_ended(quality: Any) -> None:
    """Count one ended run's quality signals (a ``queries.QualityRow``-shaped object)."""
    workflow = quality.workflow or "unknown"
    RUN_OUTCOMES.labels(workflow, quality.status).inc()
    if quality.duration_s is not None:
        RUN_DURATION.labels(workflow, quality.status).observe(max(0.0, quality.duration_s))
    RUN_COST.labels(workflow, quality.status).observe(float(quality.cost_usd))
    RUN_TOOL_CALLS.labels(workflow).inc(quality.tool_calls)
    if quality.workflow_steps is not None and quality.tool_calls > quality.workflow_steps:
        RUN_EXCESS_TOOL_CALLS.labels(workflow).inc(quality.tool_calls - quality.workflow_steps)
    RUN_RETRIES.labels(workflow).inc(quality.retries)
    RUN_TOKENS.labels(workflow).inc(quality.prompt_tokens + quality.completion_tokens)
    GUARD_REFUSALS.labels(workflow).inc(quality.guard_refusals)
    APPROVALS.labels(workflow).inc(quality.approvals)
    for wait in quality.approval_waits_s:
        APPROVAL_WAIT.labels(workflow).observe(max(0.0, wait))
