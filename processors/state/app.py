"""The state processor: a faust agent folds every run event into a table and publishes snapshots.

The table (backed by its changelog topic) is the working state; the snapshot topic is what the
decision layer reads. Both are derived from ``agent.run.events`` + ``agent.tool.results``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import faust

from processors.state.fold import Applied, RunState, apply
from streamagent import codec, faust_compat
from streamagent.config import Settings
from streamagent.dlq import headers_for
from streamagent.dlq import record as record_dead_letter
from streamagent.errors import Rejected, Unprocessable
from streamagent.events import Event, RunDeadlineExceeded, RunStatus, StepStatus, ToolResult, now, stable_id
from streamagent.metrics import EVENTS_PROCESSED, REDRIVES, RUNS
from streamagent.topics import DEAD_LETTERS, RUN_EVENTS, RUN_STATE, TOOL_RESULTS

log = logging.getLogger(__name__)
PROCESSOR = "state"


def build_app(settings: Settings) -> faust.App:
    faust_compat.apply(settings)
    brokers = ";".join(f"kafka://{s.strip()}" for s in settings.bootstrap_servers.split(","))
    app = faust.App(
        settings.group(PROCESSOR),
        broker=brokers,
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.heartbeat_interval_ms / 1000,
        broker_commit_interval=0.5,
        producer_linger=0.002,
        producer_max_request_size=16 * 1024 * 1024,
        consumer_max_fetch_size=16 * 1024 * 1024,
        datadir=str(settings.data_dir / "faust"),
        consumer_group_instance_id=settings.group_instance_id or None,
        key_serializer="json",
        value_serializer="json",
    )
    events = app.topic(
        settings.topic(RUN_EVENTS),
        settings.topic(TOOL_RESULTS),
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    run_events = app.topic(settings.topic(RUN_EVENTS), key_serializer="raw", value_serializer="raw")
    snapshots = app.topic(settings.topic(RUN_STATE), key_serializer="raw", value_serializer="raw")
    dead_letters = app.topic(settings.topic(DEAD_LETTERS), key_serializer="raw", value_serializer="raw")
    table = app.Table("runs", default=None, partitions=settings.partitions, key_type=str)

    async def publish(state: RunState) -> None:
        snap = state.snapshot
        await snapshots.send(key=snap.run_id.encode(), value=codec.encode(snap))

    async def dead_letter(message: Any, reason: str, error: str) -> None:
        record_dead_letter(PROCESSOR, message.topic, message.partition, message.offset, reason, error)
        await dead_letters.send(
            key=message.key,
            value=message.value,
            headers=headers_for(reason, error, PROCESSOR, message.topic, message.partition, message.offset),
        )

    def fold_one(message: Any) -> tuple[RunState | None, Applied]:
        event = codec.decode(message.value, settings.max_event_bytes)
        if not isinstance(event, Event) or (message.topic.endswith(TOOL_RESULTS) != isinstance(event, ToolResult)):
            raise Unprocessable("unexpected-event", f"{type(event).__name__} on {message.topic}")
        current = table.get(event.run_id)
        state = RunState.model_validate(current) if current is not None else None
        return state, apply(state, event, settings.run_deadline_s)

    async def handle(message: Any) -> None:
        try:
            state, outcome = fold_one(message)
        except Rejected as exc:
            await dead_letter(message, exc.reason, exc.detail)
            return
        if outcome.changed:
            snap = outcome.state.snapshot
            table[snap.run_id] = outcome.state.model_dump(mode="json")
            if state is None:
                RUNS.labels(RunStatus.running.value).inc()
            if snap.status.terminal and (state is None or not state.snapshot.status.terminal):
                RUNS.labels(snap.status.value).inc()
            log.debug("applied event", extra={"run_id": snap.run_id, "version": snap.version})
        # A duplicate re-publishes the current snapshot: after a crash the changelog may hold a
        # version whose snapshot never left the producer. Readers dedupe by (run, version).
        await publish(outcome.state)

    @app.agent(events)
    async def fold(stream: Any) -> None:
        async for item in stream.events():
            EVENTS_PROCESSED.labels(PROCESSOR, item.message.topic).inc()
            try:
                await handle(item.message)
            except Exception as exc:  # one bad message must never stop the fold
                log.exception("state processor failed on an event")
                await dead_letter(item.message, "processing-error", repr(exc))

    redriven: dict[str, datetime] = {}

    @app.timer(interval=1.0)
    async def watch() -> None:
        """Deadlines and re-drive, for the running runs of this worker's partitions.

        Re-drive: a run that made no progress for ``redrive_after_s`` gets its snapshot published
        again. The decision layer replays the decision recorded for that version, its tool
        republishes the recorded result, and the run moves on; so a message lost anywhere in the
        loop (a crash between two writes, a broker hiccup) costs time, never the run.
        """
        moment = now()
        idle = timedelta(seconds=settings.redrive_after_s)
        for run_id, value in list(table.items()):
            state = RunState.model_validate(value)
            snap = state.snapshot
            undoing = any(s.status is StepStatus.compensating for s in snap.steps)
            if snap.status is not RunStatus.running and not undoing:
                redriven.pop(run_id, None)
                continue
            if moment - max(snap.updated_at, redriven.get(run_id, snap.updated_at)) > idle:
                redriven[run_id] = moment
                REDRIVES.inc()
                log.info("re-driving idle run", extra={"run_id": run_id, "version": snap.version})
                await publish(state)
            if snap.status is RunStatus.running and not snap.deadline_exceeded and snap.deadline_at < moment:
                event = RunDeadlineExceeded(
                    event_id=stable_id(run_id, "deadline-exceeded"),
                    run_id=run_id,
                    causation_id=snap.last_event_id,
                    deadline_at=snap.deadline_at,
                )
                await run_events.send(key=run_id.encode(), value=codec.encode(event))

    return app


def run(settings: Settings) -> None:
    from faust import Worker

    app = build_app(settings)
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
