"""The consumer runtime against the real broker: what a handler is given, what is dead-lettered and why,
and when offsets are committed.

Each test runs ``ConsumerRuntime.run`` on a thread (as ``run_until_signalled`` does in a processor's
main thread) and stops it with ``stop()``; every wait is a deadline-bounded poll.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
from helpers import eventually

from streamagent import codec
from streamagent.config import Settings
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import RunRequested
from streamagent.kafka import admin, create_topics, group_offsets
from streamagent.kafka import producer as make_producer
from streamagent.retry import RetryPolicy
from streamagent.runtime import Batch, ConsumerRuntime
from streamagent.topics import DEAD_LETTERS, RUN_EVENTS, TopicSpec

NAME = "unit-consumer"
# Fast retries so that a test goes through many of them in well under a second.
RETRY = RetryPolicy(initial_s=0.01, max_backoff_s=0.02, max_attempts=3)
OUTAGE_RETRY = RetryPolicy(initial_s=0.01, max_backoff_s=0.05)


@dataclass(frozen=True)
class Produced:
    key: bytes
    value: bytes
    partition: int
    offset: int


def event(i: int, run: str) -> RunRequested:
    return RunRequested(
        event_id=f"ev-{i}",
        run_id=run,
        occurred_at=datetime(2025, 3, 1, 9, 0, tzinfo=UTC),
        company_name="Acme",
        company_domain="acme-robotics.io",
        contact_name="Ada Lovelace",
        contact_email="ada@acme-robotics.io",
        requested_by="crm-webhook",
    )


def events(first: int, count: int, runs: int = 5) -> list[tuple[bytes, bytes]]:
    """(key, value) of ``count`` events spread over ``runs`` keys, hence over the partitions."""
    keys = [f"run-{i % runs}" for i in range(first, first + count)]
    return [(key.encode(), codec.encode(event(i, key))) for i, key in enumerate(keys, start=first)]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test's settings with a shorter group session: the embedded broker completes a group join in
    about half the session timeout, so each runtime start takes ~1 s instead of ~3 s."""
    return settings.model_copy(update={"session_timeout_ms": 2000, "heartbeat_interval_ms": 200})


@pytest.fixture
def source(settings: Settings) -> str:
    create_topics(settings, [TopicSpec(RUN_EVENTS), TopicSpec(DEAD_LETTERS)])
    return settings.topic(RUN_EVENTS)


def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> list[Produced]:
    """Produce and wait for the broker's acknowledgement of each record: where each one landed."""
    producer = make_producer(settings)
    landed: dict[int, Produced] = {}
    for n, (key, value) in enumerate(records):

        def delivered(err: object, msg: object, n: int = n, key: bytes = key, value: bytes = value) -> None:
            assert err is None, err
            landed[n] = Produced(key, value, msg.partition(), msg.offset())  # type: ignore[attr-defined]

        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    assert producer.flush(10) == 0
    return [landed[n] for n in range(len(records))]


def ends(produced: list[Produced]) -> dict[int, int]:
    """The offset a group must have committed on each partition once it has consumed ``produced``."""
    out: dict[int, int] = {}
    for p in produced:
        out[p.partition] = max(out.get(p.partition, 0), p.offset + 1)
    return out


def committed(settings: Settings, topic: str) -> dict[int, int]:
    """The runtime group's committed offsets on ``topic``, for the partitions that have one."""
    partitions = [(topic, p) for p in range(settings.partitions)]
    offsets = group_offsets(admin(settings), settings.group(NAME), partitions)
    return {p: o for (_t, p), o in offsets.items() if o >= 0}


class Recorder:
    """A handler that records each item it handled, with the batch it came in."""

    def __init__(self, fail: Callable[[Batch], None] | None = None) -> None:
        self.fail = fail
        self.calls = 0
        self.batches: list[list[tuple[int, int, str]]] = []
        self.lock = threading.Lock()

    def __call__(self, batch: Batch) -> None:
        with self.lock:
            self.calls += 1
        if self.fail is not None:
            self.fail(batch)  # raises, or rejects items, before anything is recorded
        got = [(i.message.partition(), i.message.offset(), i.event.event_id) for i in batch]  # type: ignore[attr-defined]
        with self.lock:
            self.batches.append(got)

    def handled(self) -> list[tuple[int, int, str]]:
        with self.lock:
            return [item for batch in self.batches for item in batch]


def runtime_for(settings: Settings, topic: str, handler: Callable[[Batch], None]) -> ConsumerRuntime:
    return ConsumerRuntime(
        settings,
        NAME,
        [topic],
        handler,
        retry=RETRY,
        outage_retry=OUTAGE_RETRY,
        dependencies=("kafka", "postgres"),
    )


@contextmanager
def running(runtime: ConsumerRuntime) -> Iterator[ConsumerRuntime]:
    """``runtime.run()`` on a thread for the block; stopped and joined after it. An exception that ended
    ``run`` fails the test instead of leaving it waiting for a handler that is no longer called."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            runtime.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"runtime-{runtime.name}", daemon=True)
    thread.start()
    try:
        yield runtime
    finally:
        runtime.stop()
        thread.join(20)
    assert not thread.is_alive(), "the runtime did not stop"
    assert errors == []


def test_the_handler_sees_every_event_once_in_partition_order(settings: Settings, source: str) -> None:
    produced = produce(settings, source, events(0, 40))
    recorder = Recorder()
    with running(runtime_for(settings, source, recorder)):
        eventually(lambda: len(recorder.handled()) >= 40, timeout=30, what="40 events handled")
        eventually(lambda: committed(settings, source) == ends(produced), timeout=30, what="offsets committed")

    handled = recorder.handled()
    assert len(handled) == 40
    assert Counter(e for _p, _o, e in handled) == Counter(f"ev-{i}" for i in range(40))
    for partition in {p.partition for p in produced}:
        # Per partition: the handler got the records in the order they were written, offsets and all.
        written = [(p.offset, codec.decode(p.value).event_id) for p in produced if p.partition == partition]  # type: ignore[attr-defined]
        seen = [(o, e) for p, o, e in handled if p == partition]
        assert seen == written
    assert len({p.partition for p in produced}) > 1  # the test spans partitions, as it means to


def test_an_undecodable_message_is_dead_lettered_and_the_runtime_goes_on(settings: Settings, source: str) -> None:
    good = events(0, 2, runs=1)
    garbage = b"\x00garbage"
    truncated = good[0][1][:14]  # a valid header, the body cut short
    # One key: one partition, so the event after the bad ones shows that consumption went past them.
    produced = produce(settings, source, [good[0], (b"run-0", garbage), (b"run-0", truncated), good[1]])
    recorder = Recorder()
    with running(runtime_for(settings, source, recorder)):
        eventually(lambda: len(recorder.handled()) >= 2, timeout=30, what="the decodable events handled")
        letters = eventually(lambda: read_dead_letters(settings), timeout=30, what="dead letters")
        eventually(lambda: committed(settings, source) == ends(produced), timeout=30, what="offsets committed")

    assert [e for _p, _o, e in recorder.handled()] == ["ev-0", "ev-1"]
    # Their reason, from the codec, and the original bytes (for `dlq replay`), where they came from.
    got = sorted(
        (d.reason, d.value, d.key, d.source_topic, d.source_partition, d.source_offset, d.processor) for d in letters
    )
    assert got == [
        ("corrupt-body", truncated, b"run-0", source, produced[2].partition, produced[2].offset, NAME),
        ("not-avro", garbage, b"run-0", source, produced[1].partition, produced[1].offset, NAME),
    ]


def test_a_rejected_item_is_dead_lettered_alone(settings: Settings, source: str) -> None:
    records = events(0, 20)
    produced = produce(settings, source, records)

    def reject_run_3(batch: Batch) -> None:
        for item in list(batch):
            if item.event.run_id == "run-3":  # type: ignore[attr-defined]
                batch.reject(item, "unknown-run", f"{item.event.run_id} was never requested")  # type: ignore[attr-defined]

    recorder = Recorder(fail=reject_run_3)
    with running(runtime_for(settings, source, recorder)):
        eventually(lambda: len(recorder.handled()) >= 16, timeout=30, what="the other events handled")
        letters = eventually(
            lambda: (lambda got: got if len(got) >= 4 else None)(read_dead_letters(settings)),
            timeout=30,
            what="the rejected events dead-lettered",
        )
        eventually(lambda: committed(settings, source) == ends(produced), timeout=30, what="offsets committed")

    rejected = [p for p, (key, _v) in zip(produced, records, strict=True) if key == b"run-3"]
    assert sorted((d.source_partition, d.source_offset, d.value) for d in letters) == sorted(
        (p.partition, p.offset, p.value) for p in rejected
    )
    assert {(d.reason, d.error) for d in letters} == {("unknown-run", "run-3 was never requested")}
    # The rest of each batch went on to the handler, each event once; the rejected ones did not.
    handled = Counter(e for _p, _o, e in recorder.handled())
    assert handled == Counter(f"ev-{i}" for i in range(20) if i % 5 != 3)


def test_an_outage_is_retried_until_it_ends_and_nothing_is_committed_meanwhile(settings: Settings, source: str) -> None:
    produced = produce(settings, source, events(0, 10))
    outage_over = threading.Event()

    def database_down(batch: Batch) -> None:
        if not outage_over.is_set():
            raise psycopg.OperationalError("connection failed: the database system is starting up")

    recorder = Recorder(fail=database_down)
    runtime = runtime_for(settings, source, recorder)
    with running(runtime):
        # Far more attempts than RETRY allows for an error that is not an outage.
        eventually(lambda: recorder.calls >= 5 * RETRY.max_attempts, timeout=30, what="the outage retried")
        assert runtime.health.degraded() == ["postgres"]
        assert committed(settings, source) == {}, "offsets committed before the handler succeeded"
        assert recorder.handled() == []
        outage_over.set()
        eventually(lambda: len(recorder.handled()) >= 10, timeout=30, what="the events handled after the outage")
        eventually(lambda: committed(settings, source) == ends(produced), timeout=30, what="offsets committed")
        assert runtime.health.degraded() == []

    assert Counter(e for _p, _o, e in recorder.handled()) == Counter(f"ev-{i}" for i in range(10))
    assert read_dead_letters(settings) == []  # an outage is never the message's fault


def test_a_handler_error_that_persists_dead_letters_only_the_message_that_causes_it(
    settings: Settings, source: str
) -> None:
    produced = produce(settings, source, events(0, 12))
    poison = produced[7]  # ev-7
    poisoned_calls = Counter[str]()

    def chokes_on_ev_7(batch: Batch) -> None:
        if any(item.event.event_id == "ev-7" for item in batch):  # type: ignore[attr-defined]
            poisoned_calls["n"] += 1
            raise KeyError("a bug this event triggers")

    recorder = Recorder(fail=chokes_on_ev_7)
    with running(runtime_for(settings, source, recorder)):
        [letter] = eventually(lambda: read_dead_letters(settings), timeout=30, what="the poison dead-lettered")
        eventually(lambda: len(recorder.handled()) >= 11, timeout=30, what="the other events handled")
        eventually(lambda: committed(settings, source) == ends(produced), timeout=30, what="offsets committed")

    # What the runtime does today: the whole batch is tried RETRY.max_attempts times, then each of its
    # messages alone (again up to max_attempts), and the one that still fails is dead-lettered as a
    # processing error with the exception's repr; the others are handled once, and everything committed.
    assert (letter.reason, letter.error) == ("processing-error", "KeyError('a bug this event triggers')")
    assert (letter.source_partition, letter.source_offset) == (poison.partition, poison.offset)
    assert letter.value == poison.value
    assert poisoned_calls["n"] == 2 * RETRY.max_attempts
    assert Counter(e for _p, _o, e in recorder.handled()) == Counter(f"ev-{i}" for i in range(12) if i != 7)


def test_a_handler_error_that_goes_away_is_retried_without_dead_letters(settings: Settings, source: str) -> None:
    produced = produce(settings, source, events(0, 6))
    failures = Counter[str]()

    def fails_once(batch: Batch) -> None:
        if not failures:
            failures["n"] += 1
            raise RuntimeError("a passing glitch")

    recorder = Recorder(fail=fails_once)
    with running(runtime_for(settings, source, recorder)):
        eventually(lambda: len(recorder.handled()) >= 6, timeout=30, what="the events handled")
        eventually(lambda: committed(settings, source) == ends(produced), timeout=30, what="offsets committed")
    assert failures["n"] == 1
    assert Counter(e for _p, _o, e in recorder.handled()) == Counter(f"ev-{i}" for i in range(6))
    assert read_dead_letters(settings) == []


def test_a_new_runtime_on_the_same_group_resumes_after_the_last_processed_event(
    settings: Settings, source: str
) -> None:
    first = produce(settings, source, events(0, 10))
    before = Recorder()
    with running(runtime_for(settings, source, before)):
        eventually(lambda: len(before.handled()) >= 10, timeout=30, what="the first events handled")
        eventually(lambda: committed(settings, source) == ends(first), timeout=30, what="offsets committed")

    # The same keys, so every partition that holds a new event also holds old ones before it: had the
    # new runtime started anywhere before the committed offsets, it would meet an old event first.
    second = produce(settings, source, events(10, 10))
    after = Recorder()
    with running(runtime_for(settings, source, after)):
        eventually(lambda: len(after.handled()) >= 10, timeout=30, what="the new events handled")
        eventually(lambda: committed(settings, source) == ends(first + second), timeout=30, what="offsets committed")
    assert [e for _p, _o, e in sorted(after.handled())] == [
        codec.decode(p.value).event_id  # type: ignore[attr-defined]
        for p in sorted(second, key=lambda p: (p.partition, p.offset))
    ]


def test_a_runtime_stopped_during_an_outage_leaves_the_batch_to_the_next_owner(settings: Settings, source: str) -> None:
    produced = produce(settings, source, events(0, 8))

    def database_down(batch: Batch) -> None:
        raise psycopg.OperationalError("connection refused")

    down = Recorder(fail=database_down)
    with running(runtime_for(settings, source, down)):
        eventually(lambda: down.calls >= 3, timeout=30, what="the outage retried")
    # Stopped mid-retry: not handled, not dead-lettered, not committed.
    assert committed(settings, source) == {}
    assert read_dead_letters(settings) == []

    recorder = Recorder()
    with running(runtime_for(settings, source, recorder)):
        eventually(lambda: len(recorder.handled()) >= 8, timeout=30, what="the batch handled by the next owner")
        eventually(lambda: committed(settings, source) == ends(produced), timeout=30, what="offsets committed")
    assert Counter(e for _p, _o, e in recorder.handled()) == Counter(f"ev-{i}" for i in range(8))


def test_tick_runs_after_every_poll_never_during_a_batch_and_survives_its_errors(
    settings: Settings, source: str
) -> None:
    in_batch = threading.Event()
    ticks: list[bool] = []  # for each tick: was a batch being handled?

    def handler(batch: Batch) -> None:
        in_batch.set()
        try:
            recorder(batch)
        finally:
            in_batch.clear()

    def tick() -> None:
        ticks.append(in_batch.is_set())
        if len(ticks) % 2:
            raise RuntimeError("a tick that fails")  # logged; the next poll ticks again

    recorder = Recorder()
    runtime = runtime_for(settings, source, handler)
    runtime.tick = tick
    with running(runtime):
        # With no message at all: work due without input (waking waiting runs) still gets its turn.
        eventually(lambda: len(ticks) >= 4, timeout=30, what="ticks while idle")
        produce(settings, source, events(0, 3))
        eventually(lambda: len(recorder.handled()) >= 3, timeout=30, what="events handled between failing ticks")
        seen = len(ticks)
        eventually(lambda: len(ticks) > seen + 2, timeout=30, what="ticks after the batch")
    assert not any(ticks), "tick ran while a batch was being handled"
