"""Outages versus poison: one classification, and what the consumer runtime does with each."""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException

from streamagent.config import Settings
from streamagent.db import WAIT_FOREVER, migrate
from streamagent.errors import DependencyUnavailable, Unprocessable, outage
from streamagent.metrics import DependencyHealth, scrape, serve
from streamagent.metrics import health as get_health
from streamagent.retry import RetryPolicy
from streamagent.runtime import Batch, ConsumerRuntime, Incoming


def _chained(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("error", "dependency"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), "postgres"),
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), "postgres"),
        (psycopg.errors.CannotConnectNow("the database system is starting up"), "postgres"),
        (psycopg.InterfaceError("the connection is closed"), "postgres"),
        (httpx.ConnectError("connection refused"), "sandbox"),
        (KafkaException(KafkaError(KafkaError._TRANSPORT)), "kafka"),
        (KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT)), "kafka"),
        (BufferError("queue full"), "kafka"),
        (DependencyUnavailable("kafka", "2 commands not acknowledged"), "kafka"),
        (_chained(RuntimeError("wrapped"), psycopg.OperationalError("gone")), "postgres"),
        (ConnectionRefusedError(), "network"),
        # Never an outage: they fail the same way every time.
        (psycopg.errors.UniqueViolation("duplicate key"), None),
        (psycopg.DataError("invalid input"), None),
        (psycopg.errors.StatementTooComplex("statement is too complex"), None),
        (Unprocessable("unknown-run", "never seen"), None),
        (KeyError("bug"), None),
        (KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)), None),
    ],
)
def test_outages_are_told_from_errors_that_can_never_succeed(error: BaseException, dependency: str | None) -> None:
    assert outage(error) == dependency


class _Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, str, str]] = []

    def send(self, message: Any, reason: str, detail: str) -> None:
        self.sent.append((message, reason, detail))


class _Msg:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class _NoProducer:
    def flush(self, _timeout: float = 0) -> int:
        return 0


def _runtime(handler: Any) -> tuple[ConsumerRuntime, _Sink]:
    runtime = ConsumerRuntime(
        Settings(bootstrap_servers="127.0.0.1:1"),
        "unit",
        ["t"],
        handler,
        retry=RetryPolicy(initial_s=0.001, max_backoff_s=0.001, max_attempts=3),
        outage_retry=RetryPolicy(initial_s=0.001, max_backoff_s=0.001),
        producer=_NoProducer(),  # type: ignore[arg-type]
    )
    sink = _Sink()
    runtime.dead_letters = sink  # type: ignore[assignment]
    return runtime, sink


def _batch(sink: _Sink, n: int) -> Batch:
    return Batch([Incoming(_Msg(i), None) for i in range(n)], sink)  # type: ignore[arg-type]


def test_an_outage_is_retried_until_it_ends_and_nothing_is_dead_lettered(caplog: pytest.LogCaptureFixture) -> None:
    calls = {"n": 0}

    def handler(batch: Batch) -> None:
        calls["n"] += 1
        if calls["n"] <= 50:  # far more than HANDLER_RETRY's attempts
            raise psycopg.OperationalError("the database system is starting up")

    runtime, sink = _runtime(handler)
    with caplog.at_level(logging.WARNING):
        assert runtime._handle(_batch(sink, 4))
    assert calls["n"] == 51 and sink.sent == []
    # Logged once when it started and once when it ended, not once per retry.
    messages = [r.getMessage() for r in caplog.records if r.name == "streamagent.metrics"]
    assert len(messages) == 2 and "unavailable" in messages[0] and "is back" in messages[1]
    assert runtime.health.degraded() == []


def test_an_outage_retry_ends_when_the_runtime_stops() -> None:
    runtime, sink = _runtime(None)

    def handler(batch: Batch) -> None:
        if runtime.health.degraded():
            runtime.stop()  # stopping mid-outage: the batch is left uncommitted, not dead-lettered
        raise psycopg.OperationalError("connection refused")

    runtime.handler = handler
    done = threading.Event()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: (result.append(runtime._handle(_batch(sink, 2))), done.set()))
    thread.start()
    assert done.wait(10)
    assert result == [False] and sink.sent == []


def test_only_the_message_that_can_never_succeed_is_dead_lettered() -> None:
    def handler(batch: Batch) -> None:
        if any(item.message.offset() == 1 for item in batch):
            raise KeyError("a bug this message triggers")

    runtime, sink = _runtime(handler)
    assert runtime._handle(_batch(sink, 3))
    assert [(m.offset(), reason) for m, reason, _ in sink.sent] == [(1, "processing-error")]


def test_dependency_health_is_exposed_as_a_gauge() -> None:
    port = serve(0, "unit-health")
    health = DependencyHealth("unit-health", ("postgres", "kafka"))
    assert scrape(port, "streamagent_dependency_up", {"process": "unit-health", "dependency": "kafka"}) == 1
    labels = {"process": "unit-health", "dependency": "postgres"}
    health.down("postgres", "gone")
    health.down("postgres", "still gone")
    assert scrape(port, "streamagent_dependency_up", labels) == 0
    assert scrape(port, "streamagent_outage_retries_total", labels) == 2
    # One registry per process; other tests of this process may have left their own outages in it.
    answer = get_health(port)
    assert answer["status"] == "degraded" and answer["down"]["unit-health"] == ["postgres"]
    health.up("postgres")
    assert scrape(port, "streamagent_dependency_up", labels) == 1
    assert health.degraded() == []
    assert "unit-health" not in get_health(port)["down"]


def test_migrate_waits_for_an_unreachable_database_only_when_asked() -> None:
    down = Settings(database_url="postgresql://nobody@127.0.0.1:1/down")
    with pytest.raises(psycopg.OperationalError):
        migrate(down)  # the CLI and the stack: fail at once
    stop = threading.Event()
    attempts = threading.Timer(0.5, stop.set)  # a process told to stop while it waits
    attempts.start()
    with pytest.raises(psycopg.OperationalError):
        migrate(down, wait_s=WAIT_FOREVER, stop=stop)
    assert stop.is_set()
