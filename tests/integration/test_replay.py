"""``streamagent replay``: the log rebuilds the state table, its snapshots and the projection, identical;
a replay beside a running stack changes nothing and finds no difference; a decision replay with a
candidate that differs on a known subset reports exactly that subset and performs no effect.

One stack for all of it (the suite's budget): 200 runs (failed, escalated, dead letters among them).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from helpers import ended, eventually, read_topic
from streamagent.tools.sandbox import SandboxClient

from streamagent.config import Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.console.replay.verify import _fields, changelog_topic, live_states, same_state
from streamagent.events import RunRequested
from streamagent.kafka import producer as make_producer
from streamagent.submit import produce_requests
from streamagent.topics import COMMANDS_PREFIX, RUN_EVENTS

pytestmark = pytest.mark.integration

REPO_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
ESCALATING = "onboarding-escalate"


def _workflows(into: Path, subject: str) -> Path:
    """The stock onboarding, and a variant whose bounced welcome email escalates (instead of failing)."""
    into.mkdir()
    stock = (REPO_WORKFLOWS / "onboarding.toml").read_text()
    (into / "onboarding.toml").write_text(stock)
    variant = stock.replace('name = "onboarding"', f'name = "{ESCALATING}"', 1)
    # The subject the draft falls back to (no model in this test): the mail's subject.
    variant = variant.replace(
        'args.template_subject = "Welcome to streamagent, {request.company_name}"',
        f'args.template_subject = "{subject}"',
    )
    variant = variant.replace(
        'name = "email"\ntool = "email"\n', 'name = "email"\ntool = "email"\non_failure = "escalate"\n'
    )
    assert variant.count("escalate") >= 1 and subject in variant
    (into / f"{ESCALATING}.toml").write_text(variant)
    return into


def _requests(count: int, failed: int, escalated: int) -> tuple[list[RunRequested], set[str]]:
    requests = sample_requests(count, requested_by="replay-test")
    # enrich answers 404 for .invalid: the run fails at its first step
    fail = {"company_domain": "nowhere.invalid", "contact_email": "ops@example.com"}
    # the mailbox bounces, and this workflow escalates on it
    escalate = {"workflow": ESCALATING, "contact_email": "bounce@example.com"}
    out = [r.model_copy(update=fail) for r in requests[:failed]]
    out += [r.model_copy(update=escalate) for r in requests[failed : failed + escalated]]
    return out + requests[failed + escalated :], {r.run_id for r in out[failed:]}


def _projection(url: str) -> tuple[list, list]:
    with psycopg.connect(url) as conn:
        runs = conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall()
        events = conn.execute(
            "SELECT event_id, run_id, type, occurred_at, causation_id, step, summary, payload, topic,"
            " kafka_partition, kafka_offset FROM run_events ORDER BY event_id"
        ).fetchall()
    return runs, events


def _ends(s: Settings, topics: list[str]) -> dict[str, int]:
    return {t: len(read_topic(s, t)) for t in topics}


def test_replay_rebuilds_identical_state_beside_a_live_stack_and_after_a_wipe(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings.model_copy(update={"workflows_dir": _workflows(tmp_path / "wf", "Welcome aboard")})
    candidate = _workflows(tmp_path / "candidate", "Hello from the candidate")
    with Stack(settings) as stack:
        s = stack.settings
        for key, value in to_env(s).items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        requests, escalating = _requests(200, failed=10, escalated=10)
        run_ids = produce_requests(s, requests)
        p = make_producer(s)  # three poison messages: dead-lettered by the state processor and the projection
        for i in range(3):
            p.produce(s.topic(RUN_EVENTS), key=f"poison-{i}".encode(), value=b"not avro")
        p.flush(10)
        rows = eventually(lambda: ended(s, run_ids), timeout=150, interval=0.5, what="200 runs ended")
        statuses = Counter(r.status for r in rows)
        assert statuses == {"completed": 180, "failed": 10, "escalated": 10}, statuses
        assert {r.run_id for r in rows if r.status == "escalated"} == escalating

        # -- replay while the stack runs (and more runs are in flight): no difference, nothing written --
        since = datetime.now(UTC)
        more = produce_requests(s, sample_requests(20, requested_by="replay-test-live"))
        admin = AdminClient({"bootstrap.servers": s.bootstrap_servers})
        topics = sorted(t for t in admin.list_topics(timeout=10).topics if t.startswith(s.topic(COMMANDS_PREFIX)))
        with SandboxClient(s.sandbox_url) as sandbox:
            capsys.readouterr()
            started = time.monotonic()
            assert cli(["replay", "--json"]) == 0, capsys.readouterr()
            out = capsys.readouterr().out
            print(out, f"(live replay {time.monotonic() - started:.1f}s)")
            figures = json.loads(out.strip().splitlines()[-1])
            assert figures["differ"] == 0 and figures["runs"] >= 203, out
            assert "dead letters the live processes would have sent" in out and "state/" in out, out
            assert cli(["replay", "--apply"]) == 1  # refused: the stack runs
            assert "stop it before --apply" in capsys.readouterr().err
            with psycopg.connect(s.database_url) as conn:
                left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'replay_%'").fetchone()
            assert left == (0,), "the rebuilt schema was not dropped"

            eventually(lambda: ended(s, more), timeout=120, interval=0.5, what="the 20 live runs ended")
            # --from: only the runs requested since then, each identical to its live state.
            capsys.readouterr()
            assert cli(["replay", "--from", since.isoformat(), "--json"]) == 0, capsys.readouterr()
            out = capsys.readouterr().out
            assert json.loads(out.strip().splitlines()[-1])["runs"] == len(more), out
            assert "state table  20 same" in out and "projection   20 same" in out, out
            # -- decision replay: the candidate differs on the escalating workflow's email arguments --
            effects = len(sandbox.effects())
            commands = _ends(s, topics)
            capsys.readouterr()
            assert cli(["replay", "decisions", "--workflows", str(candidate), "--json"]) == 1
            out = capsys.readouterr().out
            print(out)
            report = json.loads(out.strip().splitlines()[-1])
            differing = report["differing"]
            assert {d["run_id"] for d in differing} == escalating, out
            assert {d["kind"] for d in differing} == {"different arguments"} and len(differing) == len(escalating)
            assert report["counts"]["same"] == sum(report["counts"].values()) - len(escalating), out
            assert "Hello from the candidate" in out and "Welcome aboard" in out
            assert len(sandbox.effects()) == effects, "a decision replay performed an effect"
            assert _ends(s, topics) == commands, "a decision replay produced a command"
            # The recorded workflow itself as the candidate: every decision the same.
            assert cli(["replay", "decisions", "--workflows", str(settings.workflows_dir)]) == 0

    # -- the stack is stopped: wipe the state table and the projection, rebuild, compare with the dump --
    before_runs, before_events = _projection(s.database_url)
    before_states = live_states(s)
    assert len(before_runs) == 220 and len(before_states) == 220
    for future in admin.delete_topics([changelog_topic(s)], operation_timeout=30).values():
        future.result(timeout=60)
    eventually(lambda: changelog_topic(s) not in admin.list_topics(timeout=10).topics, what="changelog deleted")
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE runs, run_events")
    shutil.rmtree(s.data_dir / "faust", ignore_errors=True)
    capsys.readouterr()
    started = time.monotonic()
    assert cli(["replay", "--apply"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    print(out, f"(wipe + apply {time.monotonic() - started:.1f}s)")
    assert "after --apply: identical" in out
    after_runs, after_events = _projection(s.database_url)
    assert after_events == before_events
    assert after_runs == before_runs
    after_states = live_states(s)
    changed = [r for r in before_states if not same_state(after_states.get(r), before_states[r])]
    assert not changed, _fields(after_states[changed[0]], before_states[changed[0]])
