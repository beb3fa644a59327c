"""confluent-kafka clients configured from Settings, and idempotent topic creation."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streamagent.config import Settings
from streamagent.metrics import LagFromStatistics
from streamagent.topics import TopicSpec, all_topics, physical

log = logging.getLogger(__name__)
# librdkafka's own log lines (connection refused, broker down, …) go through Python logging under this
# name, to wherever the process logs (a log file for commands a person runs), instead of being
# written straight to the terminal's stderr.
CLIENT_LOG = logging.getLogger("librdkafka")


def client_config(settings: Settings) -> dict[str, Any]:
    """What every confluent client needs to reach the cluster: servers and security (librdkafka keys).

    The one place Kafka security is mapped; it carries the SASL and key passwords, so never log it.
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        conf["sasl.mechanisms"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_security_protocol.endswith("SSL"):
        tls = {
            "ssl.ca.location": settings.kafka_ssl_ca_location,
            "ssl.certificate.location": settings.kafka_ssl_certificate_location,
            "ssl.key.location": settings.kafka_ssl_key_location,
            "ssl.key.password": settings.kafka_ssl_key_password.get_secret_value(),
        }
        conf.update({k: v for k, v in tls.items() if v})
    return conf


def producer(settings: Settings, **overrides: Any) -> Producer:
    conf: dict[str, Any] = {
        **client_config(settings),
        "logger": CLIENT_LOG,
        # Idempotence keeps a retried send from duplicating or reordering; it works on both
        # Apache Kafka and the embedded broker (BROKER-NOTES).
        "enable.idempotence": True,
        "acks": "all",
        # Few, large record batches: the embedded broker's fetch cost grows with the number of
        # batches in a partition (BROKER-NOTES). Hot paths flush per batch, so this only adds
        # latency to stray single messages.
        "linger.ms": settings.linger_ms,
        # Java's (and aiokafka's) partitioner, so that every producer (confluent here, aiokafka in
        # faust) puts a run's events on the same partition number of every topic: the state table
        # relies on that co-partitioning.
        "partitioner": "murmur2_random",
        "message.max.bytes": 16 * 1024 * 1024,
        # Never expire a message the broker has not acknowledged (librdkafka's default gives up
        # after 5 minutes): a broker outage is waited out, in order, however long it lasts. Callers
        # bound their own waits (flush timeouts) and commit input offsets only once acknowledged.
        "message.timeout.ms": 0,
    }
    conf.update(overrides)
    return Producer(conf)


def consumer(settings: Settings, group: str, **overrides: Any) -> Consumer:
    conf: dict[str, Any] = {
        **client_config(settings),
        "logger": CLIENT_LOG,
        "group.id": settings.group(group),
        # Names the process's consumer in the broker's request logs and quotas (librdkafka's default
        # is "rdkafka" for every client).
        "client.id": settings.group(group),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": settings.fetch_wait_ms,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": settings.heartbeat_interval_ms,
        "max.poll.interval.ms": max(300_000, settings.session_timeout_ms),
        "fetch.message.max.bytes": 16 * 1024 * 1024,
        "partition.assignment.strategy": settings.kafka_assignment_strategy,
    }
    if settings.group_instance_id:
        conf["group.instance.id"] = f"{settings.group_instance_id}.{group}"
    if settings.consumer_lag_interval_s > 0:
        # streamagent_consumer_lag: librdkafka computes it in its own threads; the callback parses one
        # small JSON document per interval, on the consumer's poll.
        conf["statistics.interval.ms"] = max(100, int(settings.consumer_lag_interval_s * 1000))
        conf["stats_cb"] = LagFromStatistics(settings.group(group))
    conf.update(overrides)
    return Consumer(conf)


def admin(settings: Settings) -> AdminClient:
    return AdminClient({**client_config(settings), "logger": CLIENT_LOG})


def probe(bootstrap_servers: str, timeout_s: float) -> str | None:
    """One metadata round trip with a short deadline: None if a broker answers, else why not. Commands a
    person runs call this first, so an unreachable address fails in seconds, not after a client's
    default timeouts (and its retries' log lines)."""
    client = AdminClient(
        {
            "bootstrap.servers": bootstrap_servers,
            "logger": CLIENT_LOG,
            "socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000)),
        }
    )
    try:
        client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        return exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
    finally:
        del client
    return None


def create_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Create missing topics with their final partition count; existing ones are left alone.

    Partitions are set explicitly and up front: the embedded broker cannot add partitions later
    and auto-creates topics with 4 on produce (BROKER-NOTES).
    """
    wanted = physical(settings, specs if specs is not None else all_topics())
    client = admin(settings)
    existing = set(client.list_topics(timeout=10).topics)
    new = [
        NewTopic(
            s.name,
            num_partitions=settings.partitions,
            replication_factor=settings.replication_factor,
            config=s.config(),
        )
        for s in wanted
        if s.name not in existing
    ]
    created: list[str] = []
    if not new:
        return created
    for name, future in client.create_topics(new, operation_timeout=10).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    log.info("topics created", extra={"topics": created})
    return created


def group_offsets(
    client: AdminClient, group: str, partitions: list[tuple[str, int]], timeout_s: float = 10.0
) -> dict[tuple[str, int], int]:
    """Committed offsets of another consumer group (no join, no side effect); -1 where none."""
    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in partitions])]
    result = client.list_consumer_group_offsets(request, request_timeout=timeout_s)[group].result(timeout_s)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions or []}


def table_reader(settings: Settings, topic: str, name: str) -> tuple[Consumer, set[int]]:
    """A consumer assigned every partition of ``topic`` from its first offset, for a process that folds
    the whole topic into a table of its own (the tool catalogue, the memory table): no group is joined and
    nothing is committed; partition EOF events say when each partition has been read to its end (not
    ListOffsets, which is wrong on the embedded broker)."""
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": settings.group(name),  # required by the client; never joined
            "client.id": settings.group(name),
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": settings.fetch_wait_ms,
            "auto.offset.reset": "earliest",
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    found = metadata.topics.get(topic)
    partitions = sorted(found.partitions) if found is not None and found.error is None else []
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    return consumer, set(partitions)
