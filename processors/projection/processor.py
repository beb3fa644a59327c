"""The projection: copies the event log into PostgreSQL for queries, audit and the CLI.

Idempotent by event id, so replaying topics over an existing database changes nothing, and
replaying them into an empty one rebuilds it.
"""

from __future__ import annotations

import json
import logging
import re

from psycopg.types.json import Jsonb

from streamagent import db
from streamagent.config import Settings
from streamagent.events import (
    DecisionRecorded,
    Event,
    RunCompleted,
    RunDeadlineExceeded,
    RunFailed,
    RunRequested,
    ToolCommand,
    ToolResult,
)
from streamagent.runtime import ConsumerRuntime, Incoming, Unprocessable
from streamagent.topics import COMMANDS_PREFIX, RUN_EVENTS, TOOL_RESULTS

log = logging.getLogger(__name__)
PROCESSOR = "projection"


def _short(data: dict[str, object], limit: int = 160) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(event: Event) -> tuple[str | None, str]:
    """(step, one-line summary) for the timeline."""
    match event:
        case RunRequested():
            return None, (
                f"{event.requested_by} requested onboarding of {event.company_name} ({event.company_domain}),"
                f" contact {event.contact_name} <{event.contact_email}>"
            )
        case DecisionRecorded():
            target = f" {event.step}" if event.step else ""
            return event.step, (
                f"decided {event.action.value}{target} on state v{event.based_on_version}"
                f" [{event.decider}]: {event.reason}"
            )
        case ToolCommand():
            return event.step, f"command {event.operation} → {event.tool} {_short(event.arguments, 100)}"
        case ToolResult():
            outcome = (
                _short(event.output) if event.status.value == "succeeded" else f"{event.error_kind}: {event.error}"
            )
            return event.step, (
                f"{event.tool} {event.status.value} after {event.attempts} attempt(s),"
                f" {event.duration_ms} ms: {outcome}"
            )
        case RunCompleted():
            return None, f"completed: {event.reason}"
        case RunFailed():
            return event.failed_step, f"{event.status.value}: {event.reason}"
        case RunDeadlineExceeded():
            return None, f"deadline {event.deadline_at.isoformat()} passed"
    return None, event.type


class ProjectionHandler:
    def __init__(self, settings: Settings) -> None:
        self.conn = db.connect(settings, autocommit=False)

    def __call__(self, incoming: Incoming) -> None:
        event = incoming.event
        if not isinstance(event, Event):
            raise Unprocessable("unexpected-event", f"{type(event).__name__} is not a run event")
        msg = incoming.message
        step, summary = summarize(event)
        with self.conn.transaction():
            inserted = self.conn.execute(
                "INSERT INTO run_events (event_id, run_id, type, occurred_at, causation_id, step, summary,"
                " payload, topic, kafka_partition, kafka_offset) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (event_id) DO NOTHING RETURNING 1",
                (
                    event.event_id,
                    event.run_id,
                    event.type,
                    event.occurred_at,
                    event.causation_id,
                    step,
                    summary,
                    Jsonb(event.model_dump(mode="json")),
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                ),
            ).fetchone()
            if inserted is not None:
                self._update_run(event)
        self.conn.commit()

    def _update_run(self, event: Event) -> None:
        # Runs arrive on several topics, so any event may be the first one seen for its run.
        self.conn.execute(
            "INSERT INTO runs (run_id, status, created_at, updated_at) VALUES (%s, 'running', %s, %s)"
            " ON CONFLICT (run_id) DO UPDATE SET updated_at = GREATEST(runs.updated_at, EXCLUDED.updated_at)",
            (event.run_id, event.occurred_at, event.occurred_at),
        )
        match event:
            case RunRequested():
                self.conn.execute(
                    "UPDATE runs SET company_name=%s, company_domain=%s, contact_email=%s, requested_by=%s,"
                    " created_at=LEAST(created_at, %s) WHERE run_id=%s",
                    (
                        event.company_name,
                        event.company_domain,
                        event.contact_email,
                        event.requested_by,
                        event.occurred_at,
                        event.run_id,
                    ),
                )
            case ToolResult() if event.operation == "execute":
                self.conn.execute(
                    "UPDATE runs SET steps_done = (SELECT count(DISTINCT step) FROM run_events"
                    " WHERE run_id=%s AND type='ToolResult' AND payload->>'status'='succeeded'"
                    " AND payload->>'operation'='execute') WHERE run_id=%s",
                    (event.run_id, event.run_id),
                )
            case RunCompleted():
                self.conn.execute(
                    "UPDATE runs SET status='completed', reason=%s, ended_at=%s WHERE run_id=%s",
                    (event.reason, event.occurred_at, event.run_id),
                )
            case RunFailed():
                self.conn.execute(
                    "UPDATE runs SET status=%s, reason=%s, failed_step=%s, ended_at=%s WHERE run_id=%s",
                    (event.status.value, event.reason, event.failed_step, event.occurred_at, event.run_id),
                )


def build(settings: Settings) -> ConsumerRuntime:
    db.migrate(settings)
    commands = "^" + re.escape(settings.topic(COMMANDS_PREFIX)) + ".*"
    topics = [settings.topic(RUN_EVENTS), settings.topic(TOOL_RESULTS), commands]
    return ConsumerRuntime(settings, PROCESSOR, topics, ProjectionHandler(settings))
