"""Prometheus metrics shared by every process, and the per-process endpoint."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
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
SNAPSHOTS = Counter("streamagent_snapshots_total", "Snapshots published for the decision layer")
RUNS_ADMITTED = Gauge("streamagent_runs_admitted", "Runs in flight on this state worker (admitted, not yet over)")
RUNS_WAITING = Gauge("streamagent_runs_waiting", "Requested runs waiting for room under max_running_runs")
DECISIONS = Counter(
    "streamagent_decisions_total",
    "Decisions by outcome (recorded|replayed|superseded|waiting)",
    ["decider", "outcome"],
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
