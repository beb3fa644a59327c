"""The consumer runtime: owns a processor's life (subscribe, poll, decode, dead-letter, commit).

A handler is plain code that gets a *batch* of decoded events. The runtime commits the batch's
offsets only after the handler returned and the producer flushed, so each durable effect (a
database write, a produced event) happens before Kafka forgets the input. On a crash the batch is
delivered again, and handlers are written to be idempotent.

Batches keep the hot path cheap: a handler makes one database round trip and one flush per batch
instead of per message, and produce requests carry many records (few, large batches also keep the
embedded broker's partitions short; see BROKER-NOTES).

Failures are classed in one place (``streamagent.errors.outage``). A dependency outage (PostgreSQL
restarting, the broker unreachable) retries the same batch with capped, jittered backoff for as long
as it lasts: nothing is dead-lettered and nothing is committed meanwhile, the consumer keeps polling
(its partitions paused) so it stays in its group, and the outage is logged once when it starts and
once when it ends, and shown in ``streamagent_dependency_up``. Any other error is retried
``HANDLER_RETRY`` times, then the batch is retried one message at a time so that only the message
that can never be processed is dead-lettered, with its reason.

Rebalances (several members in a group; eager ``roundrobin`` on the embedded broker, incremental
``cooperative-sticky`` on Kafka: ``kafka_assignment_strategy``): the runtime knows which partitions it
owns from the client's assign/revoke/lost callbacks, which run on its own thread inside a poll. A
handler's per-partition memory is dropped through ``on_revoke`` and rebuilt through ``on_assign``. A
batch is processed between two polls, so a partition can be taken away during a batch only while an
outage is waited out (``_wait`` polls to keep the membership): the messages of a revoked partition are
then dropped from the batch before the next attempt, nothing is produced for them, and their offsets
are never committed; their new owner (this member again, after an eager rebalance) reads them again
from the last commit (handlers are idempotent). A commit refused because the group moved on
(ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, REBALANCE_IN_PROGRESS, ...) drops the batch's commit the same
way instead of failing the process. Every rebalance, and every ``member_report_s``, the member
announces what it owns on the members topic (``streamagent.members``; ``streamagent status``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import BaseModel

from streamagent import codec
from streamagent.config import Settings
from streamagent.dlq import DeadLetterSink
from streamagent.errors import Rejected, Unprocessable, outage
from streamagent.kafka import consumer as make_consumer
from streamagent.kafka import producer as make_producer
from streamagent.members import MemberAnnouncer, confluent_partitions
from streamagent.metrics import EVENTS_PROCESSED, DependencyHealth, HopTimer
from streamagent.retry import RetryPolicy

log = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "ConsumerRuntime",
    "Incoming",
    "RetryPolicy",
    "Unprocessable",
    "run_until_signalled",
]


@dataclass(frozen=True)
class Incoming:
    message: Message
    event: BaseModel

    @property
    def source(self) -> str:
        return f"{self.message.topic()}[{self.message.partition()}]@{self.message.offset()}"


class Batch:
    """The decoded messages of one poll, in partition order, and the way to refuse one of them."""

    def __init__(self, items: list[Incoming], sink: DeadLetterSink) -> None:
        self.items = items
        self._sink = sink
        self._rejected: set[int] = set()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (item for i, item in enumerate(self.items) if i not in self._rejected)

    def __len__(self) -> int:
        return len(self.items) - len(self._rejected)

    def drop(self, partitions: set[tuple[str, int]]) -> int:
        """Leave out the messages of ``partitions`` (revoked: their new owner does them); how many."""
        kept = [it for it in self.items if (it.message.topic(), it.message.partition()) not in partitions]
        dropped = len(self.items) - len(kept)
        if dropped:
            rejected = {id(self.items[i]) for i in self._rejected}
            self.items = kept
            self._rejected = {i for i, it in enumerate(kept) if id(it) in rejected}
        return dropped

    def reject(self, item: Incoming, reason: str, detail: str) -> None:
        """Dead-letter one message; the rest of the batch goes on."""
        index = next(i for i, it in enumerate(self.items) if it is item)
        if index not in self._rejected:
            self._sink.send(item.message, reason, detail)  # first: if the broker refuses, it is rejected again
            self._rejected.add(index)


BatchHandler = Callable[[Batch], None]
# Called on the consuming thread with the partitions just assigned or taken away ((topic, partition)).
RebalanceHook = Callable[[set[tuple[str, int]]], None]


# Retries of a handler that raised something that is neither ``Rejected`` nor an outage (a bug, or a
# message the handler chokes on): then the batch is split and the culprit dead-lettered.
HANDLER_RETRY = RetryPolicy(initial_s=0.1, max_backoff_s=5.0, max_attempts=8)
# Retries during a dependency outage: forever, capped so that work resumes within ~2 s of its end.
OUTAGE_RETRY = RetryPolicy(initial_s=0.1, max_backoff_s=2.0, max_attempts=0)
# While waiting out an outage the consumer is polled this often (partitions paused), so it keeps its
# group membership however long the outage lasts (max.poll.interval.ms).
_KEEPALIVE_S = 0.2


class ConsumerRuntime:
    def __init__(
        self,
        settings: Settings,
        name: str,
        topics: Iterable[str],
        handler: BatchHandler,
        *,
        producer: Producer | None = None,
        batch_size: int | None = None,
        retry: RetryPolicy = HANDLER_RETRY,
        outage_retry: RetryPolicy = OUTAGE_RETRY,
        dependencies: Iterable[str] = ("kafka",),
        consumer_config: dict[str, object] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.topics = list(topics)
        self.handler = handler
        self.producer = producer or make_producer(settings)
        self.dead_letters = DeadLetterSink(settings, self.producer, name)
        self.batch_size = batch_size or settings.batch_size
        self.retry = retry
        self.outage_retry = outage_retry
        self.health = DependencyHealth(name, dependencies)
        self.hops = HopTimer(name)
        self.stop_event = threading.Event()
        self.consumer_config = consumer_config or {}
        self._consumer: Consumer | None = None
        # How a message becomes the handler's event: the codec by default; intake reads JSON too. A
        # ``Rejected`` it raises dead-letters the message with its reason.
        self.decoder: Callable[[Message], BaseModel] | None = None
        # Called on the consuming thread after every poll, with or without messages (never during a
        # batch): for work due without a new message, e.g. the decision layer waking waiting runs.
        self.tick: Callable[[], None] | None = None
        # Per-partition memory of the handler: dropped on revoke, rebuilt on assign (see the module doc).
        self.on_assign: list[RebalanceHook] = []
        self.on_revoke: list[RebalanceHook] = []
        self.owned: set[tuple[str, int]] = set()
        # Partitions taken away since the batch in hand was polled: its messages of them are dropped.
        self._revoked: set[tuple[str, int]] = set()
        self.members = MemberAnnouncer(settings, self.producer, name)

    def run(self) -> None:
        consumer = make_consumer(self.settings, self.name, **self.consumer_config)
        self._consumer = consumer
        consumer.subscribe(self.topics, on_assign=self._assigned, on_revoke=self._revoked_cb, on_lost=self._lost)
        log.info("consuming", extra={"processor": self.name, "topics": self.topics})
        try:
            while not self.stop_event.is_set():
                messages = self._next_batch(consumer)
                if messages:
                    self.process(messages)
                if self.tick is not None and not self.stop_event.is_set():
                    self._tick()
                if self.members.due():
                    self._announce()
        finally:
            self._announce("left")
            self.producer.flush(10)
            consumer.close()  # leaves the group: its partitions move at once, not after the session timeout
            log.info("stopped", extra={"processor": self.name})

    # -- rebalances --------------------------------------------------------------------------------
    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        added = {(tp.topic, tp.partition) for tp in partitions}
        # Not taken off ``_revoked``: a partition revoked and assigned again during a batch (an eager
        # rebalance) is read again from its committed offset, so the batch's messages of it are dropped.
        self.owned |= added
        self._rebalanced("assigned", added, self.on_assign)

    def _revoked_cb(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._take_away("revoked", partitions)

    def _lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: the session expired (a long stall) and the group gave them to another
        # member already. The same for us: forget them, commit nothing for them.
        self._take_away("lost", partitions)

    def _take_away(self, how: str, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.owned -= gone
        self._revoked |= gone
        self._rebalanced(how, gone, self.on_revoke)

    def _rebalanced(self, how: str, partitions: set[tuple[str, int]], hooks: list[RebalanceHook]) -> None:
        if not partitions:
            return
        self.members.rebalances += 1
        log.info(
            "partitions %s",
            how,
            extra={"processor": self.name, "partitions": sorted(partitions), "owned": sorted(self.owned)},
        )
        for hook in hooks:
            try:
                hook(partitions)
            except Exception:  # a hook only drops or marks memory; never worth leaving the group over
                log.exception("%s hook failed", how)
        self.members.next_soon()

    def _announce(self, state: str = "up") -> None:
        consumer = self._consumer
        partitions = confluent_partitions(consumer) if consumer is not None and state == "up" else []
        self.members.announce(partitions, "left" if state == "left" else "up")

    def _next_batch(self, consumer: Consumer) -> list[Message]:
        """What has arrived, up to a batch; if nothing has, wait up to 0.2 s for the first message only.

        ``consume(n, timeout)`` returns early only once ``n`` messages are there: asked for a batch, it
        held a lone message for the whole timeout (measured: 200 ms on every hop of a run under light
        load). Under load the local queue holds whole batches and this returns them at once."""
        self._revoked = set()
        messages = consumer.consume(self.batch_size, timeout=0)
        if not messages:
            first = consumer.poll(0.2)
            if first is None:
                return []
            messages = [first]
            if self.batch_size > 1:
                # What one call returns is current (the client discards what a rebalance made stale),
                # but a rebalance served by this second call may have taken ``first``'s partition.
                self._revoked = set()
                rest = consumer.consume(self.batch_size - 1, timeout=0)
                if (first.topic(), first.partition()) in self._revoked:
                    messages = []
                messages += rest
        # From here on, a partition taken away (in ``_wait``) is dropped from this batch and not committed.
        self._revoked = set()
        return messages

    def stop(self) -> None:
        self.stop_event.set()

    def assigned(self, topic: str) -> frozenset[int]:
        """The partitions of ``topic`` this consumer owns now: empty before it joined its group, and
        while a rebalance has taken them away. For the tick, which runs on the consuming thread."""
        consumer = self._consumer
        if consumer is None:
            return frozenset()
        return frozenset(tp.partition for tp in consumer.assignment() if tp.topic == topic)

    def _tick(self) -> None:
        assert self.tick is not None
        try:
            self.tick()
        except Exception:  # the work is retried at the next tick
            log.exception("tick failed; tried again at the next poll")

    def process(self, messages: list[Message]) -> None:
        """Decode, hand the batch over, flush, then commit (only after the durable effects)."""
        offsets: dict[tuple[str, int], int] = {}
        items: list[Incoming] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
            EVENTS_PROCESSED.labels(self.name, msg.topic()).inc()
            try:
                if self.decoder is None:
                    event = codec.decode(msg.value(), self.settings.max_event_bytes)
                else:
                    event = self.decoder(msg)
            except Rejected as exc:
                self.dead_letters.send(msg, exc.reason, exc.detail)
                continue
            self.hops.observe(msg.topic(), event)
            items.append(Incoming(msg, event))
        if not offsets:
            return
        self.members.processed += len(messages)
        if items and not self._handle(Batch(items, self.dead_letters)):
            return  # stopping mid-retry: leave the batch uncommitted for the next owner
        if not self._flush():
            return
        self._commit(offsets)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit what this member still owns; a partition taken away meanwhile is its new owner's."""
        if self._consumer is None:
            return
        owned = {key: o for key, o in offsets.items() if key not in self._revoked}
        if len(owned) < len(offsets):
            log.info(
                "not committing revoked partitions",
                extra={"processor": self.name, "partitions": sorted(set(offsets) - set(owned))},
            )
        if not owned:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in owned.items()]
        try:
            self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            # The group moved on under this batch (the commit carries the consumer's generation, and
            # the coordinator refuses an old one: ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID,
            # REBALANCE_IN_PROGRESS, ...). The partitions' owner redoes the batch from the last
            # commit, which the handlers' idempotence makes harmless: drop it, do not crash.
            error = exc.args[0] if exc.args else None
            code = error.name() if hasattr(error, "name") else str(exc)
            log.warning(
                "commit refused (%s); the batch is redone by the partitions' owner",
                code,
                extra={"processor": self.name, "partitions": sorted(owned)},
            )

    def _flush(self) -> bool:
        """Wait until the broker has acknowledged everything the handler produced (an outage of the
        broker is waited out); False if stopping first, so the batch stays uncommitted."""
        attempt = 0
        while True:
            remaining = self.producer.flush(5)
            if not remaining:
                if attempt:
                    self.health.up("kafka")
                return True
            attempt += 1
            self.health.down("kafka", f"{remaining} produced message(s) not acknowledged")
            if not self._wait(self.outage_retry.backoff(attempt)):
                return False

    def _handle(self, batch: Batch) -> bool:
        """Run the handler with retries; a batch that keeps failing is retried one message at a time,
        so that one poisonous message is dead-lettered and the others go through."""
        if self._attempts(batch) is None:
            return True
        for item in list(batch):
            if self.stop_event.is_set():
                return False
            single = Batch([item], self.dead_letters)
            error = self._attempts(single)
            if error is not None:
                if self.stop_event.is_set():
                    return False
                log.error("handler failed for good on %s", item.source)
                single.reject(item, "processing-error", repr(error))
        return True

    def _attempts(self, batch: Batch) -> Exception | None:
        """Call the handler until it returns; the last error if it never did (or we are stopping).

        An outage (``errors.outage``) is retried until the dependency is back and does not count as
        an attempt; other errors get ``self.retry.max_attempts`` attempts."""
        attempt = 0
        outages = 0
        down: set[str] = set()
        while True:
            if self._revoked and batch.drop(self._revoked):
                # Taken away while this batch waited out an outage (``_wait`` polls): not ours to do.
                log.info("dropped the revoked partitions' messages from a batch in flight")
                if not len(batch):
                    return None
            try:
                self.handler(batch)
            except Exception as exc:
                dependency = outage(exc)
                if self.stop_event.is_set():
                    return exc
                if dependency is not None:
                    outages += 1
                    down.add(dependency)
                    self.health.down(dependency, exc)
                    log.debug("outage of %s on a batch of %d (retry %d): %r", dependency, len(batch), outages, exc)
                    if not self._wait(self.outage_retry.backoff(outages)):
                        return exc
                    continue
                attempt += 1
                if self.retry.exhausted(attempt):
                    log.exception("handler failed on a batch of %d (attempt %d)", len(batch), attempt)
                    return exc
                delay = self.retry.backoff(attempt)
                log.warning(
                    "handler failed on a batch of %d (attempt %d), retrying in %.2fs: %r",
                    len(batch),
                    attempt,
                    delay,
                    exc,
                )
                if not self._wait(delay):
                    return exc
            else:
                for dependency in down:
                    self.health.up(dependency)
                return None

    def _wait(self, delay: float) -> bool:
        """Back off for ``delay`` seconds while keeping the consumer in its group: its partitions are
        paused and it is polled every ``_KEEPALIVE_S``. False if the runtime is stopping."""
        consumer = self._consumer
        if consumer is None:
            return not self.stop_event.wait(delay)
        try:
            paused = consumer.assignment()
            consumer.pause(paused)
        except KafkaException as exc:
            log.debug("could not pause partitions: %s", exc)
            return not self.stop_event.wait(delay)
        until = time.monotonic() + delay
        try:
            while not self.stop_event.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    break
                rewound: set[tuple[str, int]] = set()
                for msg in consumer.consume(self.batch_size, timeout=min(left, _KEEPALIVE_S)) or []:
                    # A partition assigned during the wait is not paused: give its messages back
                    # (rewind to the first one of each partition) and pause it too.
                    key = (msg.topic(), msg.partition())
                    if msg.error() is None and key not in rewound:
                        rewound.add(key)
                        with contextlib.suppress(KafkaException):
                            consumer.seek(TopicPartition(*key, msg.offset()))
                            consumer.pause([TopicPartition(*key)])
                        paused.append(TopicPartition(*key))
        finally:
            with contextlib.suppress(KafkaException):
                consumer.resume(paused)
        return not self.stop_event.is_set()


def run_until_signalled(runtime: ConsumerRuntime) -> None:
    """Run in the foreground; SIGINT/SIGTERM stop it after the batch in hand."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runtime.stop())
    runtime.run()
