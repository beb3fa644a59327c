"""Compare a rebuild with the live state table, snapshot topic and projection; say what differs.

Live state is read where it is durable: the state table from its changelog topic (last value per run),
the snapshots from ``agent.run.state`` (the last per run: on Apache Kafka that topic is compacted), the
projection from its tables. Every comparison is per run, and a run falls in one of four classes:

- ``same``;
- ``ahead``: the live side has folded more of the run than the replay read (the stack ran on after the
  replay's cut); expected on a running stack;
- ``behind``: the live side has not folded all of what the replay read (a processor with lag, or live
  state that was wiped); expected on a running stack, and what ``--apply`` repairs on a stopped one;
- ``differ``: the same history gave another result, or the live side holds a run the log does not.
  Never expected: it is what verification exists to find.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import sql

from streamagent import codec, db
from streamagent.config import Settings
from streamagent.events import StateSnapshot
from streamagent.processors.state.fold import RunState
from streamagent.topics import RUN_STATE

from .memory import verify_memory
from .rebuild import Rebuilt
from .sections import Difference, Report, Section, read_last


def changelog_topic(settings: Settings) -> str:
    """The state table's changelog, named as faust names it: ``<app id>-<table>-changelog``."""
    return f"{settings.group('state')}-runs-changelog"


def same_state(a: RunState | None, b: RunState | None) -> bool:
    """Equal snapshots and admission, and the same applied event ids. Their order is the order the two
    topics' records were interleaved in, which the live processor did by arrival and a replay by record
    timestamp; the fold only asks whether an id is among them."""
    if a is None or b is None:
        return a is b
    return a.snapshot == b.snapshot and a.admitted == b.admitted and sorted(a.applied) == sorted(b.applied)


def live_states(settings: Settings) -> dict[str, RunState]:
    out = {}
    for key, value in read_last(settings, changelog_topic(settings)).items():
        if value is not None:
            out[json.loads(key)] = RunState.model_validate_json(value)
    return out


def verify(settings: Settings, rebuilt: Rebuilt) -> Report:
    sections = [_states(settings, rebuilt), _snapshots(settings, rebuilt), _projection(settings, rebuilt)]
    if rebuilt.scope.full:  # memory is shared by every run: a replay of some runs leaves it out
        sections.append(verify_memory(settings))
    return Report(sections)


def _scope(rebuilt: Rebuilt, live: set[str]) -> set[str]:
    """The runs to compare: the replayed ones, and on a full replay every live one too."""
    return rebuilt.run_ids | (live if rebuilt.scope.full else set())


def _states(settings: Settings, rebuilt: Rebuilt) -> Section:
    live = live_states(settings)
    section = Section("state table")
    for run_id in sorted(_scope(rebuilt, set(live))):
        mine, theirs = rebuilt.states.get(run_id), live.get(run_id)
        if mine is None and theirs is None:
            continue
        if mine is None:
            section.found.append(Difference(run_id, "differ", "in the live table, not in the log"))
        elif theirs is None:
            section.found.append(Difference(run_id, "behind", f"not in the live table (rebuilt: {_brief(mine)})"))
        elif same_state(mine, theirs):
            section.same += 1
        else:
            section.found.append(_versions(run_id, mine.snapshot, theirs.snapshot, _fields(mine, theirs)))
    return section


def _snapshots(settings: Settings, rebuilt: Rebuilt) -> Section:
    last: dict[str, StateSnapshot] = {}
    for key, value in read_last(settings, settings.topic(RUN_STATE)).items():
        if value is None:
            continue
        snap = codec.decode(value)
        if isinstance(snap, StateSnapshot):
            last[key.decode()] = snap
    section = Section("snapshots")
    for run_id in sorted(_scope(rebuilt, set(last))):
        published = rebuilt.snapshots.get(run_id, {})
        theirs = last.get(run_id)
        if theirs is None and not published:
            continue
        if theirs is None:
            section.found.append(
                Difference(run_id, "behind", f"none published live; the fold publishes v{max(published)}")
            )
            continue
        mine = published.get(theirs.version)
        if mine is None:
            kind = "ahead" if not published or theirs.version > max(published) else "differ"
            section.found.append(
                Difference(
                    run_id,
                    kind,
                    f"live last published v{theirs.version}, the fold never"
                    f" publishes it (its versions: {sorted(published)})",
                )
            )
        elif _order_free(mine) != _order_free(theirs):
            section.found.append(Difference(run_id, "differ", f"v{theirs.version}: {_fields(mine, theirs)}"))
        elif theirs.version < max(published):
            section.found.append(
                Difference(
                    run_id, "behind", f"live last published v{theirs.version}, the fold goes on to v{max(published)}"
                )
            )
        else:
            section.same += 1
    return section


def _order_free(snap: StateSnapshot) -> StateSnapshot:
    """A published snapshot without the two fields that name the event folded last: when a step's result
    and its decision (two topics) arrive in the other order live, the snapshot published after the pair
    is the same but for these. Nor its signature: the state processor's MAC over the bytes it sent, not
    state (a replay signs nothing; the decision processor checked the live one when it decided)."""
    return snap.model_copy(update={"last_event_id": "", "updated_at": snap.created_at, "signature": ""})


_EVENT_COLUMNS = (
    "event_id, run_id, type, occurred_at, causation_id, step, summary, payload, topic, kafka_partition, kafka_offset"
)


def _projection(settings: Settings, rebuilt: Rebuilt) -> Section:
    """Row by row, every column but ``recorded_at`` (when the row was written)."""
    section = Section("projection")
    mine = sql.Identifier(rebuilt.schema)
    with db.connect(settings) as conn:
        live_schema = conn.execute("SELECT current_schema()").fetchone()[0]  # type: ignore[index]
        theirs = sql.Identifier(live_schema)
        exists = conn.execute(
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema = %s AND table_name IN ('runs', 'run_events')",
            (live_schema,),
        ).fetchone()[0]  # type: ignore[index]
        run_cols = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = 'runs'"
                " ORDER BY ordinal_position",
                (rebuilt.schema,),
            ).fetchall()
        ]
        mine_runs = _rows(conn, mine, "runs", run_cols, "run_id")
        mine_events = _events(conn, mine)
        live_runs = _rows(conn, theirs, "runs", run_cols, "run_id") if exists == 2 else {}
        live_events = _events(conn, theirs) if exists == 2 else {}
        mine_approvals = _approvals(conn, rebuilt.schema)
        live_approvals = _approvals(conn, live_schema) if exists == 2 else {}
    for run_id in sorted(_scope(rebuilt, set(live_runs))):
        a, b = mine_events.get(run_id, {}), live_events.get(run_id, {})
        ra, rb = mine_runs.get(run_id), live_runs.get(run_id)
        if ra is None and rb is None:
            continue
        if ra is None:
            section.found.append(Difference(run_id, "differ", "in the live projection, not in the log"))
            continue
        if rb is None:
            section.found.append(Difference(run_id, "behind", f"not in the live projection ({len(a)} events rebuilt)"))
            continue
        if set(a) != set(b):
            extra, missing = set(b) - set(a), set(a) - set(b)
            kind = "ahead" if not missing else "behind" if not extra else "differ"
            section.found.append(
                Difference(
                    run_id,
                    kind,
                    f"{len(missing)} event(s) only rebuilt, {len(extra)} only live"
                    f" (e.g. {sorted(missing or extra)[0]})",
                )
            )
            continue
        changed = [e for e in a if a[e] != b[e]]
        if changed:
            section.found.append(
                Difference(run_id, "differ", f"event {changed[0]}: {_cols(a[changed[0]], b[changed[0]])}")
            )
        elif ra != rb:
            section.found.append(Difference(run_id, "differ", f"runs row: {_cols(ra, rb)}"))
        elif mine_approvals.get(run_id, {}) != live_approvals.get(run_id, {}):
            ours, live = mine_approvals.get(run_id, {}), live_approvals.get(run_id, {})
            first = sorted(set(ours) | set(live))[0]
            section.found.append(
                Difference(run_id, "differ", f"approval {first}: {_cols(ours.get(first, {}), live.get(first, {}))}")
            )
        else:
            section.same += 1
    return section


def _approvals(conn: Any, schema: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The approval requests of each run (the governance table; absent in a database from before it)."""
    found = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = 'approvals'",
        (schema,),
    ).fetchone()[0]
    if not found:
        return {}
    cols = [
        "request_id",
        "run_id",
        "step",
        "tool",
        "arguments",
        "reason",
        "policy_version",
        "status",
        "requested_at",
        "expires_at",
        "decided_by",
        "note",
        "decided_at",
    ]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for request_id, row in _rows(conn, sql.Identifier(schema), "approvals", cols, "request_id").items():
        out.setdefault(row["run_id"], {})[request_id] = row
    return out


def _rows(conn: Any, schema: sql.Identifier, table: str, cols: list[str], key: str) -> dict[str, dict[str, Any]]:
    query = sql.SQL("SELECT {} FROM {}.{}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in cols), schema, sql.Identifier(table)
    )
    return {row[cols.index(key)]: dict(zip(cols, row, strict=True)) for row in conn.execute(query).fetchall()}


def _events(conn: Any, schema: sql.Identifier) -> dict[str, dict[str, dict[str, Any]]]:
    cols = [c.strip() for c in _EVENT_COLUMNS.split(",")]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for event_id, row in _rows(conn, schema, "run_events", cols, "event_id").items():
        out.setdefault(row["run_id"], {})[event_id] = row
    return out


def _cols(a: dict[str, Any], b: dict[str, Any]) -> str:
    return "; ".join(f"{k}: rebuilt {a[k]!r} ≠ live {b.get(k)!r}" for k in a if a[k] != b.get(k))[:400]


def _brief(state: RunState) -> str:
    return f"v{state.snapshot.version} {state.snapshot.status.value}"


def _versions(run_id: str, mine: StateSnapshot, theirs: StateSnapshot, fields: str) -> Difference:
    if theirs.version > mine.version:
        return Difference(run_id, "ahead", f"live v{theirs.version} {theirs.status.value}, rebuilt {mine.version}")
    if theirs.version < mine.version:
        return Difference(run_id, "behind", f"live v{theirs.version} {theirs.status.value}, rebuilt v{mine.version}")
    return Difference(run_id, "differ", f"v{mine.version}: {fields}")


def _fields(mine: Any, theirs: Any) -> str:
    a, b = _flat(mine.model_dump(mode="json")), _flat(theirs.model_dump(mode="json"))
    if isinstance(a.get("applied"), list) and isinstance(b.get("applied"), list):
        a["applied"], b["applied"] = sorted(a["applied"]), sorted(b["applied"])
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: rebuilt {a.get(k)!r} ≠ live {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))[:600]


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        out = {}
        for v in value:
            out.update(_flat(v, f"{prefix}{v['name']}."))
        return out
    return {prefix.rstrip("."): value}
