"""The memory watch: which runs decided on an entity that has changed since, told through their own log.

Every decision that read shared memory leaves a row per entity in ``decision_reads`` (run, step, entity,
the version read, the decision, the run's partition), written right after the decision is recorded. The
decision processor's memory table notes each entity it sees change; between batches (the runtime's
tick) the watch looks up the rows of the changed entities in the partitions this instance owns, and for
each row whose version is no longer the current one appends a ``MemoryChanged`` to that run's log and
forgets the row (one notice per decision read). The run's state says what the change means: a step held
for approval is decided again on the new version; a done step keeps its effect and the timeline shows
the change came after it.

Cost: nothing on a decision that reads no memory; one statement per batch that recorded decisions which
did; one indexed lookup per tick in which memory changed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from streamagent import codec
from streamagent.authn import RoleKeys
from streamagent.events import DecisionRecorded, MemoryChanged, stable_id
from streamagent.memory import MemoryTable

log = logging.getLogger(__name__)

# Rows older than this are forgotten (a change after it is not recorded against the run): a day of runs.
KEEP_READS_S = 24 * 3600.0
_SWEEP_EVERY_S = 600.0


class MemoryWatch:
    def __init__(self, table: MemoryTable, producer: Any, signer: RoleKeys, events_topic: str) -> None:
        self.table = table
        self.producer = producer
        self.signer = signer
        self.events_topic = events_topic
        self._swept = 0.0
        self.notices = 0

    @staticmethod
    def note(conn: Any, decided: list[tuple[DecisionRecorded, int]]) -> None:
        """File the reads of newly recorded decisions (``(decision, partition)``); the latest wins per step."""
        rows = [
            (d.run_id, d.step, ref, version, d.decision_id, partition)
            for d, partition in decided
            if d.memory and d.step
            for ref, version in d.memory.items()
        ]
        if not rows:
            return
        conn.execute(
            "INSERT INTO decision_reads (run_id, step, ref, version, decision_id, partition)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::text[], %s::int[])"
            " ON CONFLICT (run_id, step, ref) DO UPDATE SET version = EXCLUDED.version,"
            " decision_id = EXCLUDED.decision_id, partition = EXCLUDED.partition, recorded_at = now()",
            [list(column) for column in zip(*rows, strict=True)],
        )

    def tick(self, conn: Any, owned: frozenset[int]) -> int:
        """Tell the runs of ``owned`` partitions whose decisions read an entity that changed; how many."""
        if time.monotonic() - self._swept > _SWEEP_EVERY_S:
            conn.execute(
                "DELETE FROM decision_reads WHERE recorded_at < now() - make_interval(secs => %s)", (KEEP_READS_S,)
            )
            self._swept = time.monotonic()
        changed = self.table.take_changes()
        if not changed or not owned:
            return 0
        rows = conn.execute(
            "SELECT run_id, step, ref, version, decision_id FROM decision_reads"
            " WHERE ref = ANY(%s) AND partition = ANY(%s)",
            (sorted(changed), sorted(owned)),
        ).fetchall()
        told: list[tuple[str, str, str]] = []
        for run_id, step, ref, read, decision_id in rows:
            now = self.table.last(ref)
            version = 0 if now is None or now.deleted else now.version
            if version == read:
                continue  # changed and changed back, or a notice of a version the decision had already read
            if now is not None and now.writer.startswith(f"run:{run_id}/"):
                continue  # the run's own step wrote it (memory_writes): news to others, not to this run
            notice = MemoryChanged(
                event_id=stable_id(run_id, "memory-changed", decision_id, ref, str(version)),
                run_id=run_id,
                causation_id=decision_id,
                decision_id=decision_id,
                step=step,
                ref=ref,
                read_version=read,
                version=version,
                as_of=now.as_of if now is not None else changed[ref],
            )
            value = codec.encode(notice)
            self.producer.produce(
                self.events_topic, key=run_id.encode(), value=value, headers=self.signer.headers(value)
            )
            told.append((run_id, step, ref))
            log.info(
                "memory changed under a decision: %s v%s → v%s",
                ref,
                read,
                version,
                extra={"run_id": run_id, "step": step, "decision_id": decision_id},
            )
        if told:
            if self.producer.flush(30):  # durable before the rows are forgotten; else told again next tick
                raise RuntimeError("memory change notices not acknowledged by the broker")
            conn.execute(
                "DELETE FROM decision_reads r USING unnest(%s::text[], %s::text[], %s::text[]) AS t(run_id, step, ref)"
                " WHERE r.run_id = t.run_id AND r.step = t.step AND r.ref = t.ref",
                [list(column) for column in zip(*told, strict=True)],
            )
            self.notices += len(told)
        return len(told)
