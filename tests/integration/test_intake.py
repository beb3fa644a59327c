"""Intake on the real broker and PostgreSQL: upstream systems write the intake topic with any client, any
partitioner, any key or none, Avro or JSON; every run completes, its events sit on its run id's partition,
and replay agrees with the live state, running and stopped. The same request sent again (also after intake
restarts) starts no second run."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from confluent_kafka import Producer
from helpers import ended, eventually, read_topic
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import SandboxClient

from streamagent import codec
from streamagent.config import Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import RunRequested, stable_id
from streamagent.kafka import admin, group_offsets
from streamagent.submit import produce_requests
from streamagent.topics import RUN_EVENTS, RUN_REQUESTS

pytestmark = pytest.mark.integration


def _json(request: RunRequested, **extra: object) -> bytes:
    fields = request.model_dump(mode="json", exclude={"event_id", "causation_id", "occurred_at", "schema_version"})
    return json.dumps({**fields, **extra}).encode()


def _replay_agrees(capsys: pytest.CaptureFixture[str], runs: int) -> None:
    capsys.readouterr()
    assert cli(["replay", "--json"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["differ"] == 0 and figures["runs"] >= runs, out


def test_any_client_key_and_partitioner_runs_and_replays_identical(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = sample_requests(16, requested_by="upstream")
    with Stack(settings) as stack:
        s = stack.settings
        for key, value in to_env(s).items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        topic = s.topic(RUN_REQUESTS)
        # librdkafka's default partitioner (consistent_random), `random`, no key, a key other than the
        # run id; half Avro (the .avsc alone), half JSON (a webhook relay, kcat).
        for i, partitioner in enumerate(["consistent_random", "random", "consistent_random", "murmur2"]):
            producer = Producer({"bootstrap.servers": s.bootstrap_servers, "partitioner": partitioner})
            for j, request in enumerate(requests[i * 4 : i * 4 + 4]):
                value = codec.encode(request) if j % 2 else _json(request)
                key = {0: request.run_id.encode(), 1: request.run_id.encode(), 2: None}.get(i, b"customer-7")
                producer.produce(topic, key=key, value=value)
            assert producer.flush(10) == 0
        run_ids = [r.run_id for r in requests]
        rows = eventually(lambda: ended(s, run_ids), timeout=120, interval=0.5, what="16 runs ended")
        assert Counter(r.status for r in rows) == {"completed": 16}
        assert read_dead_letters(s) == []
        # On the run log every event of a run sits on its run id's partition, whatever the upstream did.
        events = [m for m in read_topic(s, s.topic(RUN_EVENTS)) if m.key() and m.key().decode() in run_ids]
        by_run: dict[str, set[int]] = {}
        for m in events:
            by_run.setdefault(m.key().decode(), set()).add(m.partition())
        assert all(len(parts) == 1 for parts in by_run.values()) and len(by_run) == 16
        _replay_agrees(capsys, 16)
    _replay_agrees(capsys, 16)  # the stack stopped: the log still rebuilds what was stored
    # One run by id; an id the log does not have is an error, not "identical"; --json always prints its line.
    assert cli(["replay", "--runs", requests[0].run_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"] == 1
    assert cli(["replay", "--runs", f"{requests[1].run_id},no-such-run"]) == 2
    assert "--runs: no run no-such-run in the log" in capsys.readouterr().err
    assert cli(["replay", "--no-verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"] >= 16


def _consumed(s: Settings, group: str, name: str) -> bool:
    """``group`` has committed every record of topic ``name`` (so it has acted on each)."""
    topic = s.topic(name)
    ends = Counter(m.partition() for m in read_topic(s, topic))
    done = group_offsets(admin(s), s.group(group), [(topic, p) for p in range(s.partitions)])
    return all(max(done.get((topic, p), 0), 0) >= ends[p] for p in range(s.partitions))


def test_the_same_request_twice_and_after_an_intake_restart_is_one_run(settings: Settings) -> None:
    request = sample_requests(1)[0]
    keyed = sample_requests(1)[0].model_copy(update={"run_id": "unused"})
    with Stack(settings) as stack:
        s = stack.settings
        plain = Producer({"bootstrap.servers": s.bootstrap_servers})
        # Twice by run id (Avro), twice by idempotency key (JSON, no run id, different record keys).
        produce_requests(s, [request, request])
        keyed_json = _json(keyed, idempotency_key="signup-42")
        keyed_json = json.dumps({k: v for k, v in json.loads(keyed_json).items() if k != "run_id"}).encode()
        for key in (b"a", b"b"):
            plain.produce(s.topic(RUN_REQUESTS), key=key, value=keyed_json)
        assert plain.flush(10) == 0
        keyed_id = stable_id("intake", "signup-42")
        rows = eventually(lambda: ended(s, [request.run_id, keyed_id]), timeout=90, what="both runs ended")
        assert {r.status for r in rows} == {"completed"}

        # Intake restarts; the same two requests come again.
        stack.undeploy("processor-intake")
        produce_requests(s, [request])
        plain.produce(s.topic(RUN_REQUESTS), key=b"c", value=keyed_json)
        assert plain.flush(10) == 0
        stack.add_processor("intake")
        eventually(lambda: _consumed(s, "intake", RUN_REQUESTS), timeout=60, what="intake read every request")
        eventually(lambda: _consumed(s, "state", RUN_EVENTS), timeout=60, what="the fold read every event")
        ours = (request.run_id, keyed_id)
        logged = [m for m in read_topic(s, s.topic(RUN_EVENTS)) if m.key() and m.key().decode() in ours]
        appended = Counter(m.key().decode() for m in logged if isinstance(codec.decode(m.value()), RunRequested))
        assert appended == {request.run_id: 3, keyed_id: 3}  # each copy appended: one event id per run
        # ...and folded once: one run each, each effect once, nothing dead-lettered as a duplicate.
        for run_id in (request.run_id, keyed_id):
            assert queries.run(s, run_id) is not None
            effects = Counter(e.api for e in SandboxClient(s.sandbox_url).effects(run_id=run_id))
            assert effects == {"enrich": 1, "jira": 1, "email": 1, "slack": 1}
            assert [e.type for e in queries.timeline(s, run_id)].count("RunRequested") == 1
        assert read_dead_letters(s) == []
