"""Test helpers: polling with a deadline instead of sleeping."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from streamagent.processors.projection import queries

from streamagent.config import Settings
from streamagent.events import RunRequested, new_id

T = TypeVar("T")

# The command signing keys of every test's settings (conftest's ``settings``): the first signs, both verify.
TEST_SIGNING_KEY = ("test-current", "a" * 16 + "0123456789abcdef" * 3)
TEST_OLD_KEY = ("test-previous", "b" * 16 + "fedcba9876543210" * 3)
TEST_COMMAND_KEYS = "\n".join(f"{key_id} {secret}" for key_id, secret in (TEST_SIGNING_KEY, TEST_OLD_KEY))
# The approval token keys of every test's settings (``streamagent.approval``): a key set apart from the above.
TEST_APPROVAL_KEYS = "\n".join(
    f"{key_id} {secret}" for key_id, secret in (("approval-current", "c" * 64), ("approval-previous", "d" * 64))
)


def record_decision(
    settings: Settings, run_id: str, version: int, decision_id: str, action: str = "dispatch", step: str | None = None
) -> None:
    """A row of the decision processor's ``decisions`` table, as it records one (tools read it to refuse
    stale commands); the table must exist (``db.migrate`` with the decision schema)."""
    import psycopg

    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO decisions (run_id, based_on_version, decision_id, action, step, decision_event)"
            " VALUES (%s, %s, %s, %s, %s, '')",
            (run_id, version, decision_id, action, step),
        )


def eventually(probe: Callable[[], T], timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> T:
    """Call ``probe`` until it returns something truthy; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)  # the poll interval of a deadline-bounded wait
    raise AssertionError(f"{what} not reached within {timeout}s; last value: {last!r}")


def ended(settings: Settings, run_ids: list[str]) -> list[queries.RunRow] | None:
    """The projected rows of ``run_ids`` once every one of them has ended, else None (for ``eventually``)."""
    wanted = set(run_ids)
    rows = [r for r in queries.runs(settings, limit=100_000) if r.run_id in wanted]
    return rows if len(rows) == len(run_ids) and all(r.status != "running" for r in rows) else None


def _eof_consumer(settings: Settings, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )


def _to_end(c: Consumer, settings: Settings, topic: str) -> list[Message]:
    """Every message of ``topic`` from offset 0 to each partition's end (ListOffsets is wrong on Tansu)."""
    c.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    left, out = set(range(settings.partitions)), []
    while left:
        msg = c.poll(1)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                left.discard(msg.partition())
            continue
        out.append(msg)
    return out


def read_topic(settings: Settings, topic: str) -> list[Message]:
    """Every message of a topic, read to each partition's end."""
    c = _eof_consumer(settings, f"{settings.topic_prefix}test-reader")
    try:
        return _to_end(c, settings, topic)
    finally:
        c.close()


def skip_to_end(s: Settings, topic: str, group: str) -> int:
    """Commit a group's offsets to the end of a topic, as if its messages had been consumed: a loss."""
    c = _eof_consumer(s, s.group(group))
    try:
        messages = _to_end(c, s, topic)
        ends = {m.partition(): m.offset() + 1 for m in messages}
        if ends:
            c.commit(offsets=[TopicPartition(topic, p, o) for p, o in ends.items()], asynchronous=False)
        return len(messages)
    finally:
        c.close()


def why_not_ended(settings: Settings, run_ids: list[str], logs: list[Path] = (), examples: int = 3) -> str:
    """What a test that waited for runs to end prints when they did not: their statuses, the last
    events of a few unfinished ones, and the tail of the given logs (a CI failure must explain itself)."""
    wanted = set(run_ids)
    rows = [r for r in queries.runs(settings, limit=100_000) if r.run_id in wanted]
    lines = [f"statuses: {dict(Counter(r.status for r in rows))}, {len(wanted) - len(rows)} never projected"]
    for r in [r for r in rows if r.ended_at is None][:examples]:
        lines.append(f"run {r.run_id} ({r.status}, {r.steps_done} steps, reason {r.reason!r}) ends with:")
        lines += [
            f"    {e.occurred_at:%H:%M:%S.%f} {e.type} {e.step or ''} {e.summary[:140]}"
            for e in queries.timeline(settings, r.run_id)[-6:]
        ]
    for log in logs:
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            lines += [f"--- {log.name}:", *(f"    {line[:200]}" for line in tail)]
    return "\n".join(lines)


def numbered_request(
    workflow: str, n: int, company: str, contact: str, requested_by: str, contact_email: str | None = None
) -> RunRequested:
    """Request ``n`` of a test's series: company "<company> n" at <company>n.io, the contact's mail there."""
    stem = f"{company.lower()}{n}"
    return RunRequested(
        run_id=new_id(),
        company_name=f"{company} {n}",
        company_domain=f"{stem}.io",
        contact_name=contact,
        contact_email=contact_email or f"{contact.split()[0].lower()}@{stem}.io",
        goal="onboard",
        requested_by=requested_by,
        workflow=workflow,
    )
