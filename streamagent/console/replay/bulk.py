"""The projection's handler for a replay into a schema of its own: the same rows, written in bulk.

A replay projects the whole log into an empty schema that nothing else writes, in batches of thousands
of events rather than the live few hundred. Three things the live handler does per batch for
idempotence (it may see a batch twice, or a database that already holds it) are done once here:

- ``run_events`` is written with ``COPY`` rather than ``INSERT … ON CONFLICT DO NOTHING``: an event id
  already copied in this replay is left out in Python, which keeps the first copy as the conflict rule does
  (the schema is new, so this replay's ids are the only ones in it);
- ``run_events``' primary key and index are dropped for the load and built again, under the same
  names and definitions, before anything reads the table (``finish``): one sort instead of an index
  insert per row, at a random place for the key (the event ids are uuids). A duplicate id would fail
  the key's build, loudly;
- the payload is the event's JSON text from pydantic, not a dict through ``json.dumps``;
- the recounts from ``run_events`` (steps done, tokens and cost) and the quality signals of ended runs are
  recomputed once at the end, for every run any batch would have recounted: each is a function of the
  run's rows only, and its last recount live came after the last batch that could change it.

The per-batch statements that depend on the order of events (status, reason, approvals, the runs upsert)
run as live, batch by batch, in log order.
"""

from __future__ import annotations

from typing import Any

import psycopg

from streamagent.authn import Authenticator
from streamagent.config import Settings
from streamagent.events import Event, MemoryChanged, ToolCommand
from streamagent.processors.projection.processor import AFTER_EFFECT_SQL, ProjectionHandler
from streamagent.runtime import Batch

EVENT_COLUMNS = (
    "event_id, run_id, type, occurred_at, causation_id, step, summary, payload, topic, kafka_partition, kafka_offset"
)
RECOUNT_CHUNK = 2000  # runs per statement at the end


class BulkProjection(ProjectionHandler):
    def __init__(self, settings: Settings) -> None:
        # Replay projects what the live projection would: only events that verify (streamagent.authn).
        super().__init__(settings, authenticator=Authenticator.of(settings))
        self.copied: set[str] = set()  # event ids in run_events
        self.counted: set[str] = set()
        self.costed: set[str] = set()
        self.touched: set[str] = set()
        self.memory_changes: list[str] = []  # MemoryChanged event ids: said "after the effect" at the end

    def start(self) -> None:
        """Drop ``run_events``' indexes for the load (nothing reads the table until ``finish``)."""
        with self.db.conn.transaction():
            self.db.conn.execute("DROP INDEX run_events_by_run")
            self.db.conn.execute("ALTER TABLE run_events DROP CONSTRAINT run_events_pkey")

    def __call__(self, batch: Batch) -> None:
        rows, events = self.rows(batch)
        if not rows:
            return
        fresh = []
        for row in rows:
            if row[0] not in self.copied:
                self.copied.add(row[0])  # type: ignore[arg-type]
                fresh.append(row)
        conn = self.db.conn
        self.memory_changes += [e.event_id for e in events if isinstance(e, MemoryChanged)]
        with conn.transaction():
            with conn.cursor() as cur, cur.copy(f"COPY run_events ({EVENT_COLUMNS}) FROM STDIN") as copy:
                for row in fresh:
                    copy.write_row(row)
            with conn.pipeline(), conn.cursor() as cur:
                self._update_runs(cur, events)
                self._update_quality(cur, events)

    @staticmethod
    def _payload(event: Event) -> object:
        # COPY's text format takes the JSON text as is: pydantic writes it in one pass, where the live
        # handler's dict goes through json.dumps (the same document once PostgreSQL has parsed it).
        return event.model_dump_json()

    def _recount(self, cur: psycopg.Cursor[Any], counted: list[str], costed: list[str]) -> None:
        self.counted.update(counted)
        self.costed.update(costed)

    def _update_quality(self, cur: psycopg.Cursor[Any], events: list[Event]) -> bool:
        self.touched.update(e.run_id for e in events if not isinstance(e, ToolCommand))
        return False

    def finish(self) -> None:
        """``run_events``' indexes, then the recounts and quality signals deferred to the end, in one
        transaction."""
        conn = self.db.conn
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("ALTER TABLE run_events ADD CONSTRAINT run_events_pkey PRIMARY KEY (event_id)")
            cur.execute("CREATE INDEX run_events_by_run ON run_events (run_id, occurred_at)")
            counted, costed, touched = sorted(self.counted), sorted(self.costed), sorted(self.touched)
            for i in range(0, max(len(counted), len(costed)), RECOUNT_CHUNK):
                super()._recount(cur, counted[i : i + RECOUNT_CHUNK], costed[i : i + RECOUNT_CHUNK])
            if self.memory_changes:  # as live, once every result is in the table (and before the counts)
                cur.execute(AFTER_EFFECT_SQL, (self.memory_changes,))
            for i in range(0, len(touched), RECOUNT_CHUNK):
                self.recompute_quality(cur, touched[i : i + RECOUNT_CHUNK])
