"""The intake processor: upstream requests in, signed ``RunRequested`` events out; memory writes likewise.

Its own consumer group on the intake topics (``agent.run.requests``; ``agent.memory.requests``, whose
admitted writes go to the memory processor keyed by entity), as many members as partitions.
Per batch: each request is read (Avro or JSON), validated (schema, sizes, a known workflow) and appended
to the run log keyed by its run id with the project's partitioner, signed as intake's
(``streamagent.authn``); a refused one is dead-lettered with a reason that names the field and never
reaches the run log. Offsets are committed after the appends are acknowledged (the runtime's rule), and
a redelivered request appends the same event again, which the fold and projection take once.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Message
from streamagent.processors.intake.request import admit, admit_write, fields_of
from streamagent.processors.workflow import load_workflows

from streamagent import codec
from streamagent.authn import INTAKE, RoleKeys, role_keys
from streamagent.config import Settings
from streamagent.events import MemoryWrite, RunRequested
from streamagent.metrics import INTAKE_REQUESTS
from streamagent.runtime import Batch, ConsumerRuntime
from streamagent.topics import MEMORY_REQUESTS, MEMORY_WRITES, RUN_EVENTS, RUN_REQUESTS

log = logging.getLogger(__name__)
PROCESSOR = "intake"


class IntakeHandler:
    def __init__(self, settings: Settings, signer: RoleKeys, producer: Any, workflows: frozenset[str]) -> None:
        self.settings = settings
        self.signer = signer
        self.producer = producer
        self.workflows = workflows
        self.events_topic = settings.topic(RUN_EVENTS)
        self.memory_requests_topic = settings.topic(MEMORY_REQUESTS)
        self.memory_writes_topic = settings.topic(MEMORY_WRITES)

    def decode(self, msg: Message) -> RunRequested | MemoryWrite:
        """What goes on: a request for the run log, a memory write for the memory processor;
        ``Rejected`` (dead-lettered by the runtime) if refused."""
        position = (msg.topic(), msg.partition(), msg.offset())
        try:
            if msg.topic() == self.memory_requests_topic:
                return admit_write(fields_of(msg.value(), self.settings.max_event_bytes, MemoryWrite), position)
            fields = fields_of(msg.value(), self.settings.max_event_bytes)
            request = admit(fields, self.workflows, position)
        except Exception:
            INTAKE_REQUESTS.labels("refused").inc()
            raise
        return request

    def __call__(self, batch: Batch) -> None:
        for item in batch:
            event = item.event
            value = codec.encode(event)
            if isinstance(event, MemoryWrite):
                # Keyed by the entity: every change of one entity goes to the one member that writes it.
                self.producer.produce(
                    self.memory_writes_topic, key=event.ref.encode(), value=value, headers=self.signer.headers(value)
                )
                INTAKE_REQUESTS.labels("accepted").inc()
                log.info("memory write accepted", extra={"entity": event.ref, "writer": event.writer})
                continue
            assert isinstance(event, RunRequested)
            self.producer.produce(
                self.events_topic, key=event.run_id.encode(), value=value, headers=self.signer.headers(value)
            )
            INTAKE_REQUESTS.labels("accepted").inc()
            log.info("request accepted", extra={"run_id": event.run_id, "workflow": event.workflow})


def build(settings: Settings) -> ConsumerRuntime:
    signer = role_keys(settings, INTAKE)  # no key, no start (one line naming the setting)
    workflows = frozenset(load_workflows(settings.workflows_dir))  # a malformed file stops the start
    topics = [settings.topic(RUN_REQUESTS), settings.topic(MEMORY_REQUESTS)]
    runtime = ConsumerRuntime(settings, PROCESSOR, topics, lambda _: None)
    handler = IntakeHandler(settings, signer, runtime.producer, workflows)
    runtime.handler = handler
    runtime.decoder = handler.decode
    return runtime
