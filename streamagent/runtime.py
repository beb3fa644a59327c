"""The consumer runtime: owns a processor's life (subscribe, poll, decode, dead-letter, commit).

A handler is plain code that gets one decoded event. The runtime commits a batch's offsets only
after every handler call returned and the producer flushed, so each durable effect (a database
write, a produced event) happens before Kafka forgets the input. On a crash the batch is
delivered again, and handlers are written to be idempotent.
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

__all__ = ["ConsumerRuntime", "Incoming", "RetryPolicy", "Unprocessable", "run_until_signalled"]


@dataclass(frozen=True)
class Incoming:
    message: Message
    event: BaseModel

    @property
    def source(self) -> str:
        return f"{self.message.topic()}[{self.message.partition()}]@{self.message.offset()}"


Handler = Callable[[Incoming], None]


# Retries of a handler that raised something other than ``Unprocessable`` (a database blip).
HANDLER_RETRY = RetryPolicy(initial_s=0.1, max_backoff_s=5.0, max_attempts=8)


class ConsumerRuntime:
    def __init__(
        self,
        settings: Settings,
        name: str,
        topics: Iterable[str],
        handler: Handler,
        *,
        producer: Producer | None = None,
        batch_size: int = 200,
        retry: RetryPolicy = HANDLER_RETRY,
    ) -> None:
        self.settings = settings
        self.name = name
        self.topics = list(topics)
        self.handler = handler
        self.producer = producer or make_producer(settings)
        self.dead_letters = DeadLetterSink(settings, self.producer, name)
        self.batch_size = batch_size
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
                batch = consumer.consume(self.batch_size, timeout=0.2)
                if batch:
                    self._process(batch)
        finally:
            self.producer.flush(10)
            consumer.close()
            log.info("stopped", extra={"processor": self.name})

    def stop(self) -> None:
        self.stop_event.set()

    def _process(self, batch: list[Message]) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for msg in batch:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            if self.stop_event.is_set():
                break
            self._one(msg)
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
        if not offsets:
            return
        remaining = self.producer.flush(30)
        if remaining:
            # Not committing means the batch comes again; the handlers are idempotent.
            log.error("producer could not flush %d messages; batch will be redelivered", remaining)
            return
        assert self._consumer is not None
        self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)

    def _one(self, msg: Message) -> None:
        EVENTS_PROCESSED.labels(self.name, msg.topic()).inc()
        try:
            event = codec.decode(msg.value(), self.settings.max_event_bytes)
        except codec.DecodeError as exc:
            self.dead_letters.send(msg, exc.reason, exc.detail)
            return
        incoming = Incoming(msg, event)
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                self.handler(incoming)
                return
            except Unprocessable as exc:
                self.dead_letters.send(msg, exc.reason, exc.detail)
                return
            except Exception as exc:
                if self.retry.exhausted(attempt) or self.stop_event.is_set():
                    log.exception("handler failed for good on %s", incoming.source)
                    self.dead_letters.send(msg, "processing-error", repr(exc))
                    return
                delay = self.retry.backoff(attempt)
                log.warning(
                    "handler failed on %s (attempt %d), retrying in %.2fs: %r",
                    incoming.source,
                    attempt,
                    delay,
                    exc,
                )
                self.stop_event.wait(delay)


def run_until_signalled(runtime: ConsumerRuntime) -> None:
    """Run in the foreground; SIGINT/SIGTERM stop it after the batch in hand."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runtime.stop())
    runtime.run()
