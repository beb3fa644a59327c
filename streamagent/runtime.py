"""The consumer runtime: owns a processor's life (subscribe, poll, decode, dead-letter, commit).

A handler is plain code that gets a *batch* of decoded events. The runtime commits the batch's
offsets only after the handler returned and the producer flushed, so each durable effect (a
database write, a produced event) happens before Kafka forgets the input. On a crash the batch is
delivered again, and handlers are written to be idempotent.

Batches keep the hot path cheap: a handler makes one database round trip and one flush per batch
instead of per message, and produce requests carry many records (few, large batches also keep the
embedded broker's partitions short; see BROKER-NOTES).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from pydantic import BaseModel

from streamagent import codec
from streamagent.config import Settings
from streamagent.dlq import DeadLetterSink
from streamagent.errors import Unprocessable
from streamagent.kafka import consumer as make_consumer
from streamagent.kafka import producer as make_producer
from streamagent.metrics import EVENTS_PROCESSED
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

    def reject(self, item: Incoming, reason: str, detail: str) -> None:
        """Dead-letter one message; the rest of the batch goes on."""
        index = next(i for i, it in enumerate(self.items) if it is item)
        if index not in self._rejected:
            self._rejected.add(index)
            self._sink.send(item.message, reason, detail)


BatchHandler = Callable[[Batch], None]


# Retries of a handler that raised something other than ``Rejected`` (a database blip).
HANDLER_RETRY = RetryPolicy(initial_s=0.1, max_backoff_s=5.0, max_attempts=8)


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
    ) -> None:
        self.settings = settings
        self.name = name
        self.topics = list(topics)
        self.handler = handler
        self.producer = producer or make_producer(settings)
        self.dead_letters = DeadLetterSink(settings, self.producer, name)
        self.batch_size = batch_size or settings.batch_size
        self.retry = retry
        self.stop_event = threading.Event()
        self._consumer: Consumer | None = None

    def run(self) -> None:
        consumer = make_consumer(self.settings, self.name)
        self._consumer = consumer
        consumer.subscribe(self.topics)
        log.info("consuming", extra={"processor": self.name, "topics": self.topics})
        try:
            while not self.stop_event.is_set():
                messages = consumer.consume(self.batch_size, timeout=0.2)
                if messages:
                    self.process(messages)
        finally:
            self.producer.flush(10)
            consumer.close()
            log.info("stopped", extra={"processor": self.name})

    def stop(self) -> None:
        self.stop_event.set()

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
                items.append(Incoming(msg, codec.decode(msg.value(), self.settings.max_event_bytes)))
            except codec.DecodeError as exc:
                self.dead_letters.send(msg, exc.reason, exc.detail)
        if not offsets:
            return
        if items and not self._handle(Batch(items, self.dead_letters)):
            return  # stopping mid-retry: leave the batch uncommitted for the next owner
        remaining = self.producer.flush(30)
        if remaining:
            # Not committing means the batch comes again; the handlers are idempotent.
            log.error("producer could not flush %d messages; batch will be redelivered", remaining)
            return
        if self._consumer is not None:
            tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            self._consumer.commit(offsets=tps, asynchronous=False)

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
        """Call the handler until it returns; the last error if it never did (or we are stopping)."""
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                self.handler(batch)
                return None
            except Exception as exc:
                if self.retry.exhausted(attempt) or self.stop_event.is_set():
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
                self.stop_event.wait(delay)
        return RuntimeError("no attempt made")


def run_until_signalled(runtime: ConsumerRuntime) -> None:
    """Run in the foreground; SIGINT/SIGTERM stop it after the batch in hand."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runtime.stop())
    runtime.run()
