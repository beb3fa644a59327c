"""Dead letters: what a processor could not decode or process, kept byte for byte with the reason."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import Message, Producer

from streamagent.config import Settings
from streamagent.metrics import DEAD_LETTERS
from streamagent.topics import DEAD_LETTERS as DLQ_TOPIC

log = logging.getLogger(__name__)

# Header names. The value is the original message value, untouched, so `dlq replay` can put it
# back exactly as it was.
H_REASON = "dlq.reason"
H_ERROR = "dlq.error"
H_PROCESSOR = "dlq.processor"
H_TOPIC = "dlq.source.topic"
H_PARTITION = "dlq.source.partition"
H_OFFSET = "dlq.source.offset"
H_AT = "dlq.at"
# The original record's authentication (streamagent.authn's header), kept so that `dlq replay` puts back
# a record its writer signed exactly as it was: without it the fold would refuse it as unauthenticated.
H_AUTH = "streamagent-auth"


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    error: str
    processor: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes | None
    at_ms: int
    dlq_offset: int = -1
    dlq_partition: int = -1
    auth: bytes | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready view for listings: the value's size, not its bytes."""
        data = asdict(self)
        data["key"] = self.key.decode(errors="replace") if self.key else None
        data["value_bytes"] = len(self.value or b"")
        data.pop("value")
        data["signed"] = data.pop("auth") is not None
        return data

    @classmethod
    def from_message(cls, msg: Message) -> DeadLetter:
        raw = dict(msg.headers() or [])
        headers = {k: (v or b"").decode(errors="replace") for k, v in raw.items()}
        return cls(
            reason=headers.get(H_REASON, "?"),
            error=headers.get(H_ERROR, ""),
            processor=headers.get(H_PROCESSOR, "?"),
            source_topic=headers.get(H_TOPIC, "?"),
            source_partition=int(headers.get(H_PARTITION, "-1")),
            source_offset=int(headers.get(H_OFFSET, "-1")),
            key=msg.key(),
            value=msg.value(),
            at_ms=int(headers.get(H_AT, "0")),
            dlq_offset=msg.offset(),
            dlq_partition=msg.partition(),
            auth=raw.get(H_AUTH),
        )

    def replay_headers(self) -> list[tuple[str, bytes]] | None:
        """The headers to put the original record back with (its authentication, if it had one)."""
        return [(H_AUTH, self.auth)] if self.auth is not None else None


def headers_for(
    reason: str, error: str, processor: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    return [
        (H_REASON, reason.encode()),
        (H_ERROR, error[:4000].encode()),
        (H_PROCESSOR, processor.encode()),
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_AT, str(int(time.time() * 1000)).encode()),
    ]


class DeadLetterSink:
    def __init__(self, settings: Settings, producer: Producer, processor: str) -> None:
        self.topic = settings.topic(DLQ_TOPIC)
        self.producer = producer
        self.processor = processor

    def send(self, msg: Message, reason: str, error: str) -> None:
        """Dead-letter ``msg``. The caller flushes before committing the source offset."""
        self.send_raw(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), reason, error, msg.headers())

    def send_raw(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        error: str,
        original_headers: object = None,
    ) -> None:
        """Dead-letter a message given by its parts (for clients other than confluent-kafka's)."""
        record(self.processor, topic, partition, offset, reason, error)
        headers = headers_for(reason, error, self.processor, topic, partition, offset)
        auth = _auth_of(original_headers)
        if auth is not None:
            headers.append((H_AUTH, auth))
        self.producer.produce(self.topic, key=key, value=value, headers=headers)


def _auth_of(headers: object) -> bytes | None:
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, dict) else headers
    for name, value in pairs:  # type: ignore[union-attr]
        if name == H_AUTH:
            return value.encode() if isinstance(value, str) else value
    return None


def record(processor: str, topic: str, partition: int, offset: int, reason: str, error: str) -> None:
    """Count and log a dead letter, naming where it came from."""
    DEAD_LETTERS.labels(processor, reason).inc()
    log.warning(
        "dead-lettered %s[%s]@%s: %s",
        topic,
        partition,
        offset,
        reason,
        extra={"reason": reason, "error": error[:500], "processor": processor},
    )
