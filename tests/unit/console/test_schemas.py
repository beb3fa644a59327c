"""Each layer owns its tables: applying one layer's schema creates that layer's tables and no other."""

from __future__ import annotations

from streamagent.processors.decision.schema import SCHEMA as DECISION
from streamagent.processors.projection.schema import SCHEMA as PROJECTION
from streamagent.tools.sdk.schema import SCHEMA as LEDGER

from streamagent import db
from streamagent.config import Settings
from streamagent.console.devstack.stack import SCHEMAS


def tables(settings: Settings) -> set[str]:
    with db.connect(settings) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def test_each_layer_creates_only_its_own_tables(settings: Settings) -> None:
    db.migrate(settings, LEDGER)
    assert tables(settings) == {"tool_ledger"}
    db.migrate(settings, DECISION)
    decision = {"decisions", "decision_progress", "decision_waits", "run_plans", "decision_reads"}
    assert tables(settings) == {"tool_ledger", *decision}
    db.migrate(settings, PROJECTION)
    assert tables(settings) == {
        "tool_ledger",
        *decision,
        "runs",
        "run_events",
        "approvals",
        "memory_versions",
    }
    assert {s.owner for s in SCHEMAS} == {"projection", "decision", "tool_ledger"}  # the stack applies all


def test_migrating_again_or_from_an_older_shape_reaches_the_current_one(settings: Settings) -> None:
    first, *later = PROJECTION.statements
    db.migrate(settings, db.Schema("projection", (first,)))  # a database from before `workflow` existed
    db.migrate(settings, *SCHEMAS)
    db.migrate(settings, *SCHEMAS)  # idempotent
    with db.connect(settings) as conn:
        columns = {
            r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name='runs'")
        }
    assert "workflow" in columns and later


def test_a_decision_database_from_before_durable_waits_gets_its_waits_table(settings: Settings) -> None:
    older = [st for st in DECISION.statements if "decision_waits" not in st]
    db.migrate(settings, db.Schema("decision", tuple(older)))
    assert "decision_waits" not in tables(settings)
    db.migrate(settings, DECISION)
    assert "decision_waits" in tables(settings)


def test_a_decision_database_from_before_spending_columns_gets_them(settings: Settings) -> None:
    older = [st for st in DECISION.statements if "prompt_tokens" not in st]
    db.migrate(settings, db.Schema("decision", tuple(older)))
    with db.connect(settings) as conn:
        conn.execute(
            "INSERT INTO decisions (run_id, based_on_version, decision_id, action, decision_event)"
            " VALUES ('r', 1, 'd', 'dispatch', '\\x00')"
        )
    db.migrate(settings, DECISION)
    db.migrate(settings, DECISION)  # idempotent
    with db.connect(settings) as conn:
        row = conn.execute("SELECT prompt_tokens, completion_tokens, cost_usd FROM decisions").fetchone()
    assert row == (None, None, None)  # older rows: read from their stored event (llm/ledger.py)
    assert "run_plans" in tables(settings)
