"""Make a full rebuild the live state: only while nothing live writes it.

The projection's rebuilt tables replace the live ones in one transaction (``ALTER TABLE … SET SCHEMA``:
no copy, and a reader sees the old tables or the new ones, never a mix). The state table is rebuilt by
writing, to its changelog topic, the rebuilt state of every run whose live value differs; faust recovers
the table from that changelog when the state processor starts. The snapshot topic is not written: on
start the state processor publishes again the snapshot of every run that waits for a decision (and the
decider answers a snapshot it already decided with its recorded decision), so a rebuilt table is enough
for the runs to carry on.

Refused while a stack runs in the data dir (its lock is held), and, on Apache Kafka, while the state or
projection consumer group has members: the live processes would write over the swap. The embedded
broker does not report group members (BROKER-NOTES), so there the data dir's lock is the check.
"""

from __future__ import annotations

import json
import os

from confluent_kafka import KafkaException
from confluent_kafka.admin import NewTopic
from psycopg import sql

from streamagent import db
from streamagent.config import Settings
from streamagent.console.devstack.stackfile import running_pid
from streamagent.kafka import admin, producer
from streamagent.processors.state.fold import RunState

from .rebuild import Rebuilt
from .verify import changelog_topic, same_state


class Refused(Exception):
    """Applying now would race live writers, or would throw away runs outside the replay."""


def live_writers(settings: Settings, own_lock: bool = False, groups: bool = True) -> str | None:
    """Why the live state may be written right now (a running stack, group members), or None.

    ``own_lock``: this process holds the data dir's lock itself (it started the broker and PostgreSQL
    alone, for the replay), so the lock says nothing about a stack."""
    pid = running_pid(settings.data_dir.resolve())
    if pid is not None and not (own_lock and pid == os.getpid()):
        return f"a stack is running in {settings.data_dir.resolve()} (pid {pid or 'unknown'})"
    if not groups:
        return None
    names = [settings.group("state"), settings.group("projection")]
    try:
        # Short: the embedded broker may not answer this at all (and reports no members when it does).
        described = admin(settings).describe_consumer_groups(names, request_timeout=2)
        for group, future in described.items():
            members = future.result(timeout=2).members
            if members:
                return f"consumer group {group} has {len(members)} member(s)"
    except (KafkaException, TimeoutError):
        pass  # an unknown group (never started) has no members; a broker that cannot tell, see above
    return None


# Every table of the projection's schema the log rebuilds (the governance approvals included).
PROJECTED_TABLES = ("runs", "run_events", "approvals")


def apply(settings: Settings, rebuilt: Rebuilt, live: dict[str, RunState], own_lock: bool = False) -> tuple[int, int]:
    """Swap the projection in and write the changed states; returns (runs projected, states written)."""
    if not rebuilt.scope.full:
        raise Refused("--apply rebuilds everything, so it takes a full replay (no --runs, --from or --until)")
    why = live_writers(settings, own_lock, groups=False)  # the caller asked the groups before the rebuild
    if why is not None:
        raise Refused(f"{why}: stop it before --apply (a replay without --apply is safe while it runs)")
    written = _write_changelog(settings, rebuilt, live)
    projected = _swap(settings, rebuilt.schema)
    return projected, written


def _swap(settings: Settings, schema: str) -> int:
    mine = sql.Identifier(schema)
    with db.connect(settings, autocommit=False) as conn:
        live = sql.Identifier(conn.execute("SELECT current_schema()").fetchone()[0])  # type: ignore[index]
        for table in PROJECTED_TABLES:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}.{}").format(live, sql.Identifier(table)))
            conn.execute(sql.SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(mine, sql.Identifier(table), live))
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(mine))
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}.runs").format(live)).fetchone()[0]  # type: ignore[index]
        conn.commit()
    return int(count)


def _write_changelog(settings: Settings, rebuilt: Rebuilt, live: dict[str, RunState]) -> int:
    topic = changelog_topic(settings)
    client = admin(settings)
    if topic not in client.list_topics(timeout=10).topics:
        # As faust would create it: one partition per run partition, compacted.
        spec = NewTopic(topic, settings.partitions, settings.replication_factor, config={"cleanup.policy": "compact"})
        client.create_topics([spec], operation_timeout=10)[topic].result(timeout=30)
    p = producer(settings)
    written = 0
    for run_id, state in sorted(rebuilt.states.items()):
        if same_state(live.get(run_id), state):
            continue
        # Key and value as ``FaustTableStore.put`` writes them, to the run's own partition.
        key = json.dumps(run_id).encode()
        p.produce(topic, key=key, value=state.model_dump_json().encode(), partition=rebuilt.partitions[run_id])
        written += 1
        if written % 10_000 == 0:
            p.poll(0)
    if p.flush(60):
        raise RuntimeError(f"the changelog {topic} did not acknowledge every rebuilt state")
    return written
