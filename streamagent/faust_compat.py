"""Adjustments faust-streaming needs to run correctly.

Two for the embedded broker, applied by ``apply(settings)`` before the faust app starts, and
harmless on Apache Kafka (they only change a wait time and how the end of a changelog is measured).
One for any broker, ``commit_from``: the group commits what the application says it has processed,
not what faust's acknowledgement bookkeeping concludes (which passes records it skipped around a
rebalance; see ``processors/state/offsets.py``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from streamagent.config import Settings
from streamagent.kafka import client_config

log = logging.getLogger(__name__)


def true_highwaters(
    settings: Settings, partitions: Iterable[tuple[str, int]], timeout_s: float = 15.0
) -> dict[tuple[str, int], int]:
    """End offsets as carried in fetch responses.

    The embedded broker's ListOffsets answers "start of the last batch + 1", which makes faust's
    table recovery stop before the end of a changelog and silently lose the newest values. The
    high-water mark in a fetch response is right, so fetch the last batch and read it from there.
    """
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": "streamagent-highwater-probe",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            # Should retention delete the probed record meanwhile (Apache Kafka), any later record
            # carries the same high-water mark.
            "auto.offset.reset": "earliest",
        }
    )
    try:
        result: dict[tuple[str, int], int] = {}
        starts: list[TopicPartition] = []
        for topic, partition in partitions:
            low, listed = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if listed <= low:
                # No record to fetch: none was written, or retention deleted them all (Apache Kafka;
                # Tansu keeps everything). The end is the listed end; fetching before it would wait
                # for a record that is gone until the timeout.
                result[(topic, partition)] = max(listed, 0)
            else:
                starts.append(TopicPartition(topic, partition, listed - 1))
        if not starts:
            return result
        consumer.assign(starts)
        pending = {(tp.topic, tp.partition) for tp in starts}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            key = (msg.topic(), msg.partition())
            if key in pending:
                _low, high = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
                result[key] = high
                pending.discard(key)
                consumer.pause([TopicPartition(*key)])
        if pending:
            raise TimeoutError(f"could not read the end of {sorted(pending)}")
        return result
    finally:
        consumer.close()


def broker_credentials(settings: Settings) -> Any:
    """faust's ``broker_credentials`` from the settings ``kafka.client_config`` maps; None for PLAINTEXT."""
    import faust

    protocol = settings.kafka_security_protocol
    context = ssl_context(settings) if protocol.endswith("SSL") else None
    if protocol.startswith("SASL_"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            ssl_context=context,  # None: SASL_PLAINTEXT
            mechanism=settings.kafka_sasl_mechanism,
        )
    return faust.SSLCredentials(context) if context is not None else None


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS as librdkafka does it: verify the brokers and their host names (the CA file, else the
    system's), and present the client certificate if one is set."""
    context = ssl.create_default_context(cafile=settings.kafka_ssl_ca_location or None)
    if settings.kafka_ssl_certificate_location:
        context.load_cert_chain(
            settings.kafka_ssl_certificate_location,
            settings.kafka_ssl_key_location or None,
            settings.kafka_ssl_key_password.get_secret_value() or None,
        )
    return context


def apply(settings: Settings) -> None:
    from faust.transport.drivers import aiokafka as driver

    thread_cls: Any = driver.AIOKafkaConsumerThread
    if getattr(thread_cls, "_streamagent_patched", False):
        return
    create_consumer = thread_cls._create_worker_consumer

    def _create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create_consumer(self, transport)
        # faust hard-codes fetch_max_wait_ms=1500; the embedded broker holds every fetch for half
        # of it even when data is waiting, which would add ~750 ms to every hop.
        consumer._fetch_max_wait_ms = settings.fetch_wait_ms
        return consumer

    async def _highwaters(self: Any, partitions: list[Any]) -> Mapping[Any, int]:
        loop = asyncio.get_running_loop()
        ends = await loop.run_in_executor(
            None,
            true_highwaters,
            settings,
            [(tp.topic, tp.partition) for tp in partitions],
        )
        return {tp: ends[(tp.topic, tp.partition)] for tp in partitions}

    thread_cls._create_worker_consumer = _create_worker_consumer
    thread_cls._highwaters = _highwaters
    thread_cls._streamagent_patched = True
    log.debug("faust patched for the embedded broker")


def commit_from(app: Any, offsets: Callable[[tuple[str, int]], int | None]) -> None:
    """Make ``app``'s consumer commit, per partition, the offset ``offsets`` gives (None: nothing yet).

    faust commits the end of the first run of consecutive acknowledged offsets, counting as
    acknowledged the offsets it took for holes in the log; around a rebalance it takes records it
    skipped for holes, so its commit passes records nobody processed (faust-streaming issues 312,
    606). The application's own account is committed instead, through faust's commit path (the
    timer, a revoke, a stop; only partitions owned, only forward). faust's acknowledgement lists are
    emptied on the way, so they do not grow.
    """
    from faust.transport import consumer as base

    cls: Any = base.Consumer
    if not getattr(cls, "_streamagent_commit_from", False):
        original = cls._new_offset

        def _new_offset(self: Any, tp: Any) -> int | None:
            source = getattr(self.app, "_streamagent_offsets", None)
            if source is None:
                return original(self, tp)
            self._acked[tp].clear()
            self._acked_index[tp].clear()
            self._gap.pop(tp, None)
            return source((tp.topic, tp.partition))

        cls._new_offset = _new_offset
        cls._streamagent_commit_from = True
    app._streamagent_offsets = offsets
