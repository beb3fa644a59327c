"""The snapshot each recorded decision was decided on, for ``replay decisions`` to decide on again.

Read from ``agent.run.state`` by (run, version): the snapshots the live decider saw, with the run's
approvals up to then. A version the topic no longer holds (Apache Kafka compacts it) is re-derived by
folding the run's events. A decision made on waking a run that waited for a tool was decided on a
state no topic holds (the state processor publishes none for a recorded wait): it is derived from the
wait's snapshot as the decision processor derives it (``woken.after_wait``).
"""

from __future__ import annotations

from streamagent import codec, db
from streamagent.config import Settings
from streamagent.events import DecisionRecorded, StateSnapshot, stable_id
from streamagent.kafka import admin
from streamagent.processors.decision.woken import after_wait
from streamagent.topics import RUN_STATE

from .rebuild import Scope, rebuild
from .source import whole_topic


def snapshots(
    settings: Settings, wanted: set[tuple[str, int]], timeout_s: float = 120.0
) -> dict[tuple[str, int], StateSnapshot]:
    """Every (run, version) of ``wanted`` the snapshot topic still holds."""
    topic = settings.topic(RUN_STATE)
    meta = admin(settings).list_topics(timeout=10).topics.get(topic)
    found: dict[tuple[str, int], StateSnapshot] = {}
    if meta is None or not wanted:
        return found
    runs = {r.encode() for r, _ in wanted}
    # A snapshot compaction removed is re-derived by the caller: what was read by the deadline is enough.
    for msg in whole_topic(settings, topic, list(meta.partitions), "replay.decisions", timeout_s, to_the_end=False):
        if msg.key() not in runs:
            continue
        snap = codec.decode(msg.value())
        if isinstance(snap, StateSnapshot) and (snap.run_id, snap.version) in wanted:
            found[(snap.run_id, snap.version)] = snap
    return found


def woken_from(record: DecisionRecorded) -> tuple[str, int] | None:
    """The (run, version) of the wait a decision was made on waking from, or None: the decision
    processor decides a woken run on a state whose last event is that wait (``after_wait``)."""
    version = record.based_on_version - 1
    waited = stable_id(record.run_id, "decision", str(version))
    return (record.run_id, version) if version >= 1 and record.causation_id == waited else None


def recorded_waits(settings: Settings, keys: set[tuple[str, int]]) -> dict[tuple[str, int], DecisionRecorded]:
    """The recorded waits for a tool at ``keys`` (also those outside ``--since``, which woken decisions need)."""
    if not keys:
        return {}
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT d.decision_event FROM decisions d JOIN unnest(%s::text[], %s::bigint[]) AS k(run_id, version)"
            " ON d.run_id = k.run_id AND d.based_on_version = k.version WHERE d.action = 'wait'",
            ([r for r, _ in keys], [v for _, v in keys]),
        ).fetchall()
    out = {}
    for (event,) in rows:
        record = codec.decode(bytes(event))
        if isinstance(record, DecisionRecorded) and record.tool is not None:
            out[(record.run_id, record.based_on_version)] = record
    return out


def decided_on(settings: Settings, records: list[DecisionRecorded]) -> dict[tuple[str, int], StateSnapshot]:
    """The snapshot each recorded decision was decided on, by (run, version), where one can be had."""
    woken = {(r.run_id, r.based_on_version): w for r in records if (w := woken_from(r)) is not None}
    waits = recorded_waits(settings, set(woken.values()))
    woken = {key: w for key, w in woken.items() if w in waits}
    wanted = {(r.run_id, r.based_on_version) for r in records} - set(woken)
    wanted |= set(woken.values())
    snaps = snapshots(settings, wanted)
    lost = {run_id for run_id, version in wanted if (run_id, version) not in snaps}
    if lost:  # compacted away: fold those runs again for the snapshots they published
        folded = rebuild(settings, Scope(runs=frozenset(lost)), project=False)
        for run_id, versions in folded.snapshots.items():
            for version, snap in versions.items():
                if (run_id, version) in wanted:
                    snaps.setdefault((run_id, version), snap)
    for key, wait in woken.items():
        if wait in snaps:
            snaps[key] = after_wait(snaps[wait], waits[wait])
    return snaps
