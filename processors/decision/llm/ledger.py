"""What a model-decided run has spent, and its plan: read from (and the plan written to) the decision
layer's own tables.

Spending is summed over the run's recorded decisions (``decisions.prompt_tokens``, ...; a row stored
before those columns existed holds NULL, and its figures are read from the stored DecisionRecorded).
The plan is one ``run_plans`` row per run, written once: the first writer wins, and whoever lost the
race (another instance after a rebalance) uses the winner's plan, so a run never pays for two plans.

One connection, shared by the decider's threads under a lock: these are small indexed reads between
model calls that take seconds. A PostgreSQL error propagates: the handler's batch fails and is retried
whole, as for any decision it could not store.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field
from streamagent.processors.decision.llm.budget import Spending

from streamagent import codec, db
from streamagent.events import DecisionRecorded


class PlanRecord(BaseModel):
    """A run's plan as stored: the plan, or why there is none, and what making it cost."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    run_id: str
    based_on_version: int = Field(ge=1)
    plan: str | None
    error: str | None = None
    model: str
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    cost_usd: float = Field(0.0, ge=0)
    audit: dict[str, Any] = Field(default_factory=dict)

    @property
    def spending(self) -> Spending:
        return Spending(self.prompt_tokens + self.completion_tokens, self.cost_usd)


@dataclass(frozen=True)
class RunSpent:
    spent: Spending
    last_version: int  # the latest state version with a recorded decision; 0: none yet


_PLAN_COLUMNS = "run_id, based_on_version, plan, error, model, prompt_tokens, completion_tokens, cost_usd, audit"


class RunLedger:
    def __init__(self, database_url: str) -> None:
        # Lazy: a decider with no planner and no cap never connects.
        self.db = db.Reconnecting(database_url)
        self._lock = threading.Lock()

    def spent(self, run_id: str) -> RunSpent:
        with self._lock:
            rows = self.db.conn.execute(
                "SELECT based_on_version, prompt_tokens, completion_tokens, cost_usd,"
                " CASE WHEN prompt_tokens IS NULL THEN decision_event END FROM decisions WHERE run_id = %s",
                (run_id,),
            ).fetchall()
        total, last = Spending(), 0
        for version, prompt, completion, cost, event in rows:
            last = max(last, int(version))
            if prompt is None:
                record = codec.decode(bytes(event))
                assert isinstance(record, DecisionRecorded)
                prompt, completion, cost = record.prompt_tokens, record.completion_tokens, record.cost_usd
            total = total + Spending(int(prompt) + int(completion or 0), float(cost or 0.0))
        return RunSpent(total, last)

    def plan(self, run_id: str) -> PlanRecord | None:
        with self._lock:
            row = self.db.conn.execute(f"SELECT {_PLAN_COLUMNS} FROM run_plans WHERE run_id = %s", (run_id,)).fetchone()
        return _record(row) if row else None

    def save_plan(self, record: PlanRecord) -> PlanRecord:
        """Store ``record`` unless the run has a plan already; returns the stored one (the first wins)."""
        with self._lock:
            conn = self.db.conn
            conn.execute(
                f"INSERT INTO run_plans ({_PLAN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (run_id) DO NOTHING",
                (
                    record.run_id,
                    record.based_on_version,
                    record.plan,
                    record.error,
                    record.model,
                    record.prompt_tokens,
                    record.completion_tokens,
                    record.cost_usd,
                    Jsonb(record.audit),
                ),
            )
            row = conn.execute(f"SELECT {_PLAN_COLUMNS} FROM run_plans WHERE run_id = %s", (record.run_id,)).fetchone()
        assert row is not None
        return _record(row)


def _record(row: tuple[Any, ...]) -> PlanRecord:
    return PlanRecord.model_validate(dict(zip([c.strip() for c in _PLAN_COLUMNS.split(",")], row, strict=True)))
