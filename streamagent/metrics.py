"""Prometheus metrics shared by every process, and the per-process endpoint."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

EVENTS_PROCESSED = Counter(
    "streamagent_events_processed_total", "Events handled by a processor", ["processor", "topic"]
)
DEAD_LETTERS = Counter(
    "streamagent_dead_letters_total", "Messages sent to the dead-letter topic", ["processor", "reason"]
)
TOOL_CALLS = Counter(
    "streamagent_tool_calls_total",
    "Tool command outcomes (succeeded|failed|retried|deduplicated)",
    ["tool", "outcome"],
)
TOOL_CALL_SECONDS = Histogram("streamagent_tool_call_seconds", "Duration of one external call", ["tool"])
CIRCUIT_STATE = Gauge("streamagent_circuit_state", "0 closed, 1 half-open, 2 open", ["tool"])
RUNS = Counter("streamagent_runs_total", "Runs that reached a status", ["status"])
DECISIONS = Counter(
    "streamagent_decisions_total",
    "Decisions by outcome (recorded|replayed|superseded|waiting)",
    ["decider", "outcome"],
)


def serve(port: int) -> int:
    """Start the metrics endpoint; port 0 asks the OS for a free one. Returns the bound port."""
    server, _thread = start_http_server(port, addr="127.0.0.1" if port == 0 else "0.0.0.0")
    bound = int(server.server_address[1])
    log.info("metrics endpoint up", extra={"metrics_port": bound})
    return bound
