"""The memory processor: admitted writes in, entity versions out; the one writer of each entity.

Its own consumer group on ``agent.memory.writes`` (keyed by entity, so one member owns every change of a
key), and the only writer of the memory topic. Per batch: the member's own ``MemoryTable`` is first
brought up to everything the broker acknowledged before the batch (its earlier batches' versions
included), then each write is checked (written by intake, based on the version it names) and applied in
order; an applied write is published as the entity's next ``EntityVersion``, signed as ``memory``. A
write whose ``expected_version`` is not the current one is dead-lettered as ``version-conflict`` with
both versions named: a writer that did not see the latest change does not overwrite it. Offsets are
committed after the versions are acknowledged (the runtime's rule); a write delivered again is
recognised by its id (``recent_writes``) and applied once.

Cost of the freshness wait: one fetch wait (``STREAMAGENT_FETCH_WAIT_MS``) plus ~20 ms per batch, not per
write; a busy member applies whole batches at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from streamagent.processors.memory.apply import apply

from streamagent import codec
from streamagent.authn import MEMORY, Authenticator, RoleKeys, Unauthenticated, issue
from streamagent.config import Settings
from streamagent.errors import DependencyUnavailable
from streamagent.events import EntityVersion, MemoryWrite, now
from streamagent.memory import MemoryTable
from streamagent.runtime import Batch, ConsumerRuntime
from streamagent.signing import load_keys
from streamagent.topics import MEMORY as MEMORY_TOPIC
from streamagent.topics import MEMORY_WRITES

log = logging.getLogger(__name__)
PROCESSOR = "memory"


class MemoryHandler:
    def __init__(
        self,
        settings: Settings,
        table: MemoryTable,
        authenticator: Authenticator,
        signer: RoleKeys,
        producer: Any,
    ) -> None:
        self.table = table
        self.authenticator = authenticator
        self.signer = signer
        self.producer = producer
        self.topic = settings.topic(MEMORY_TOPIC)

    def __call__(self, batch: Batch) -> None:
        # Everything written before this batch (the last batch's versions were acknowledged before its
        # offsets were committed) must be in the table before a version is counted on from it.
        if not self.table.fresh_since(time.monotonic()):
            raise DependencyUnavailable("kafka", f"the memory table did not catch up with {self.table.topic}")
        written: dict[str, EntityVersion] = {}  # this batch's own versions, newer than the table's
        for item in batch:
            write = item.event
            if not isinstance(write, MemoryWrite):
                batch.reject(item, "unexpected-event", f"a {type(write).__name__}: this topic takes MemoryWrite")
                continue
            try:
                self.authenticator.verify(write, item.message.value(), item.message.headers())
            except Unauthenticated as exc:
                batch.reject(item, "unauthenticated", str(exc))
                continue
            last = written.get(write.ref) or self.table.last(write.ref)
            result = apply(last, write, now())
            if result.outcome == "conflict":
                batch.reject(item, "version-conflict", result.detail)
                log.warning("memory write refused", extra={"entity": write.ref, "reason": result.detail})
                continue
            if result.outcome == "duplicate" or result.version is None:
                continue
            version = result.version
            value = codec.encode(version)
            self.producer.produce(self.topic, key=version.ref.encode(), value=value, headers=self.signer.headers(value))
            written[version.ref] = version
            log.info(
                "memory version published",
                extra={"entity": version.ref, "version": version.version, "writer": version.writer},
            )


def build(settings: Settings) -> ConsumerRuntime:
    pipeline = load_keys(settings)  # it verifies intake's writes and signs as memory: the trusted core
    table = MemoryTable(settings, "memory-writer", Authenticator(pipeline)).start()
    runtime = ConsumerRuntime(settings, PROCESSOR, [settings.topic(MEMORY_WRITES)], lambda _: None)
    runtime.handler = MemoryHandler(settings, table, Authenticator(pipeline), issue(pipeline, MEMORY), runtime.producer)
    return runtime
