"""Failure is the normal case: faults, crashes, outages, permanent errors, poison messages.

Every process here is a separate OS process supervised by ``Stack``; the broker and PostgreSQL are
real. Figures worth quoting are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Producer
from helpers import TEST_COMMAND_KEYS, TEST_OLD_KEY, ended, eventually, read_topic, record_decision, skip_to_end
from pydantic import SecretStr
from streamagent.processors.projection import queries
from streamagent.tools.jira import Jira
from streamagent.tools.sandbox import FaultSpec, SandboxClient

from streamagent import codec
from streamagent.authn import tool_keys
from streamagent.catalogue import now_ms
from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.dlq_ops import read_dead_letters, replay
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    OnboardingRequest,
    RunStatus,
    StateSnapshot,
    StepState,
    ToolCommand,
    ToolResult,
    ToolStatus,
    new_id,
    now,
)
from streamagent.kafka import producer as make_producer
from streamagent.metrics import scrape
from streamagent.signing import parse_keys, sign
from streamagent.submit import produce_requests
from streamagent.topics import RUN_EVENTS, RUN_REQUESTS, RUN_STATE, TOOL_REGISTRY, TOOL_RESULTS, command_topic

pytestmark = pytest.mark.integration

APIS = ("enrich", "jira", "email", "slack")


def steps_done(settings: Settings, run_ids: list[str]) -> int:
    wanted = set(run_ids)
    return sum(r.steps_done for r in queries.runs(settings, limit=100_000) if r.run_id in wanted)


def results_of(settings: Settings, tool: str) -> int:
    """Successful results of one tool, as projected."""
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM run_events WHERE type = 'ToolResult' AND payload->>'tool' = %s"
            " AND payload->>'status' = 'succeeded'",
            (tool,),
        ).fetchone()
    return int(row[0]) if row else 0


def assert_one_effect_per_run_and_step(sandbox: SandboxClient, run_ids: list[str]) -> None:
    per = Counter((e.run_id, e.api) for e in sandbox.effects())
    duplicated = {k: n for k, n in per.items() if n > 1}
    assert not duplicated, f"duplicated effects: {duplicated}"
    missing = [(r, a) for r in run_ids for a in APIS if per[(r, a)] != 1]
    assert not missing, f"missing effects: {missing[:10]}"


def test_hundred_runs_complete_through_5xx_and_429(settings: Settings) -> None:
    with Stack(settings) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        for api in APIS:
            sandbox.set_faults(api, FaultSpec(error_rate=0.20, rate_429=0.05, retry_after_s=0.2))
        run_ids = produce_requests(s, sample_requests(100))
        rows = eventually(lambda: ended(s, run_ids), timeout=240, what="100 runs ended")
        assert Counter(r.status for r in rows) == {"completed": 100}
        assert_one_effect_per_run_and_step(sandbox, run_ids)
        stats = sandbox.stats()
        faults = {api: stats[api]["faults"] for api in APIS}
        injected = sum(f["5xx"] + f["429"] for f in faults.values())
        # Roughly a quarter of ~400+ calls were refused, and every one of them was retried.
        assert injected >= 60, faults
        print(f"\n[faults] 100/100 completed, 0 duplicated effects, {injected} injected faults retried: {faults}")


def _restart_and_progress(stack: Stack, name: str, s: Settings, progress_type: str, tool: str | None = None) -> float:
    """kill -9 a child, wait for the supervisor to restart it, return seconds to its first progress."""
    old = stack.kill(name)
    eventually(
        lambda: stack.children[name].pid not in (None, old) and stack.children[name].alive(),
        timeout=30,
        what=f"{name} restarted",
    )
    restarted = time.time()
    with psycopg.connect(s.database_url) as conn:

        def progressed() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM run_events WHERE type = %s AND occurred_at > to_timestamp(%s)"
                " AND (%s::text IS NULL OR payload->>'tool' = %s)",
                (progress_type, restarted, tool, tool),
            ).fetchone()
            return bool(row and row[0] > 0)

        try:
            eventually(progressed, timeout=90, interval=0.05, what=f"progress after restarting {name}")
        except AssertionError:
            latest = conn.execute(
                "SELECT max(occurred_at), max(recorded_at), count(*) FROM run_events WHERE type = %s", (progress_type,)
            ).fetchone()
            raise AssertionError(f"no {progress_type} after {restarted} (restart); latest: {latest}") from None
    return time.time() - restarted


def test_kill_nine_each_process_mid_flight_resumes_without_repeating(settings: Settings) -> None:
    # Each tool works on 4 commands at a time and jira takes 300 ms a call: the batched loop is fast
    # enough that, without this, every jira command could be done before jira is killed.
    settings = settings.model_copy(update={"tool_max_in_flight": 4})
    with Stack(settings) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        for api in APIS:  # slow the APIs so that many runs are mid-flight at each kill
            sandbox.set_faults(api, FaultSpec(latency_ms=300 if api == "jira" else 80))
        run_ids = produce_requests(s, sample_requests(100))
        figures = {}
        eventually(lambda: results_of(s, "enrich") >= 10, timeout=120, what="runs under way")
        figures["processor-decision"] = _restart_and_progress(stack, "processor-decision", s, "DecisionRecorded")
        # Each next kill follows the previous restart's first progress at once, while most runs still
        # have the killed process's work ahead of them.
        assert results_of(s, "jira") < 100, "jira finished before it could be killed; nothing to measure"
        figures["tool-jira"] = _restart_and_progress(stack, "tool-jira", s, "ToolResult", tool="jira")
        assert ended(s, run_ids) is None, "runs finished before the state processor could be killed"
        figures["processor-state"] = _restart_and_progress(stack, "processor-state", s, "DecisionRecorded")
        rows = eventually(lambda: ended(s, run_ids), timeout=240, what="100 runs ended")
        assert Counter(r.status for r in rows) == {"completed": 100}
        assert_one_effect_per_run_and_step(sandbox, run_ids)
        with psycopg.connect(s.database_url) as conn:
            # No step ran twice: one ledger row per (run, step), each finished once.
            per_step = conn.execute(
                "SELECT run_id, step, count(*) FROM tool_ledger GROUP BY run_id, step HAVING count(*) > 1"
            ).fetchall()
            assert per_step == []

            def distinct_results() -> bool:
                row = conn.execute(
                    "SELECT count(DISTINCT payload->>'command_id') FROM run_events WHERE type='ToolResult'"
                ).fetchone()
                return row is not None and row[0] == 500  # 100 runs of 5 steps

            eventually(distinct_results, timeout=30, what="one result per command projected")
        print(
            "\n[crash] seconds from restart to first progress: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
        )


def _metrics_port(s: Settings, process: str) -> int:
    path = s.data_dir / "metrics" / f"{process}.port"
    return int(eventually(lambda: path.exists() and path.read_text(), timeout=30, what=f"{path}"))


def test_breaker_opens_while_api_is_down_and_runs_complete_when_it_returns(settings: Settings) -> None:
    with Stack(settings) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        sandbox.set_faults("jira", FaultSpec(down=True))
        run_ids = produce_requests(s, sample_requests(10))
        port = _metrics_port(s, "tool-jira")
        eventually(
            lambda: scrape(port, "streamagent_circuit_state", {"tool": "jira"}) == 2,
            timeout=60,
            what="jira breaker open",
        )
        # While it is open, commands wait: no run failed, and no jira effect happened.
        assert all(r.status == "running" for r in queries.runs(s))
        down_calls = sandbox.stats()["jira"]["faults"]["down"]
        sandbox.set_faults("jira", FaultSpec())
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="runs ended after the outage")
        assert Counter(r.status for r in rows) == {"completed": 10}
        assert_one_effect_per_run_and_step(sandbox, run_ids)
        assert scrape(port, "streamagent_circuit_state", {"tool": "jira"}) == 0
        # The breaker kept calls during the outage far below "every command retrying flat out".
        print(f"\n[breaker] {down_calls} calls reached the API while it was down, for 10 waiting commands")


def test_permanent_email_error_fails_the_run_and_keeps_partial_results(settings: Settings) -> None:
    request = sample_requests(1)[0].model_copy(update={"contact_email": "bounce@acme-robotics.io"})
    with Stack(settings) as stack:
        s = stack.settings
        run_ids = produce_requests(s, [request])
        (row,) = eventually(lambda: ended(s, run_ids), timeout=60, what="run ended")
        assert row.status == "failed" and row.failed_step == "email"
        assert "recipient rejected" in (row.reason or "")
        timeline = queries.timeline(s, request.run_id)
        failed = [e for e in timeline if e.type == "RunFailed"]
        assert len(failed) == 1
        results = failed[0].payload["results"]
        assert set(results) == {"enrich", "jira", "draft"} and results["jira"]["key"]
        effects = Counter(e.api for e in SandboxClient(s.sandbox_url).effects())
        assert effects == {"enrich": 1, "jira": 1}
        # The email step was not retried: a permanent error is final. (Results travel on their own
        # topic, so the projection may copy this one a moment after the run's end.)
        email_result = eventually(
            lambda: [e for e in queries.timeline(s, request.run_id) if e.type == "ToolResult" and e.step == "email"],
            timeout=30,
            what="email result projected",
        )
        assert email_result[0].payload["attempts"] == 1
        assert email_result[0].payload["error_kind"] == "permanent"


def _unknown_run_events(s: Settings) -> dict[str, bytes]:
    ghost = "ghost-" + new_id()
    request = OnboardingRequest(
        company_name="Ghost",
        company_domain="ghost.io",
        contact_name="G",
        contact_email="g@ghost.io",
        goal="g",
        requested_by="t",
    )
    snap = StateSnapshot(
        run_id=ghost,
        version=5,
        status=RunStatus.running,
        request=request,
        steps=[StepState(name="enrich")],
        created_at=now(),
        updated_at=now(),
        deadline_at=now(),
        last_event_id=new_id(),
    )
    return {
        s.topic(RUN_EVENTS): codec.encode(
            DecisionRecorded(
                run_id=ghost,
                decision_id=new_id(),
                based_on_version=3,
                action=DecisionAction.dispatch,
                step="enrich",
                reason="forged",
                decider="test",
            )
        ),
        s.topic(TOOL_RESULTS): codec.encode(
            ToolResult(run_id=ghost, command_id=new_id(), tool="enrich", step="enrich", status=ToolStatus.succeeded)
        ),
        s.topic(RUN_STATE): codec.encode(snap),
        # A command with a made-up decision, as anyone who can write the topic could produce it: it
        # carries no signature, so the tool refuses it (``unauthenticated``) before looking at anything.
        s.topic(command_topic("enrich")): codec.encode(
            ToolCommand(
                run_id=ghost,
                command_id=new_id(),
                decision_id=new_id(),
                tool="enrich",
                step="enrich",
                arguments={"domain": "ghost.io"},
                deadline_at=now(),
            )
        ),
    }


def test_poison_messages_land_in_the_dead_letter_topic_and_nothing_crashes(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_event_bytes": 64 * 1024})
    with Stack(settings) as stack:
        s = stack.settings
        topics = [s.topic(RUN_EVENTS), s.topic(TOOL_RESULTS), s.topic(RUN_STATE), s.topic(command_topic("enrich"))]
        unknown_fp = b"\xc3\x01" + os.urandom(8) + b"\x02\x04"
        producer = Producer({"bootstrap.servers": s.bootstrap_servers, "message.max.bytes": 4 * 1024 * 1024})
        unknown_run = _unknown_run_events(s)
        for topic in topics:
            producer.produce(topic, key=b"poison", value=b"\x00garbage\xff not avro")
            producer.produce(topic, key=b"poison", value=unknown_fp)
            producer.produce(topic, key=b"poison", value=unknown_run[topic])
            producer.produce(topic, key=b"poison", value=b"\xc3\x01" + b"x" * (200 * 1024))
        assert producer.flush(10) == 0
        expected = {
            ("state", s.topic(RUN_EVENTS)),
            ("state", s.topic(TOOL_RESULTS)),
            ("decision", s.topic(RUN_STATE)),
            ("tool.enrich", s.topic(command_topic("enrich"))),
        }
        # An event of a run nobody requested, written by a producer holding no key, fails its
        # authentication (streamagent.authn) before anything looks for its run; so does the forged command.
        reasons = {"not-avro", "unknown-schema", "unauthenticated", "oversized"}
        tool_reasons = reasons

        def landed() -> set[tuple[str, str, str]]:
            got = {(d.processor, d.source_topic, d.reason) for d in read_dead_letters(s)}
            want = {(p, t, r) for p, t in expected for r in (tool_reasons if p.startswith("tool.") else reasons)}
            return got if want <= got else set()

        got = eventually(landed, timeout=90, interval=0.5, what="every poison message dead-lettered")
        # The projection reads the same log and refuses the undecodable ones too.
        assert {r for p, _t, r in got if p == "projection"} >= {"not-avro", "unknown-schema", "oversized"}
        letters = read_dead_letters(s)
        oversized = [d for d in letters if d.reason == "oversized"]
        assert all(len(d.value or b"") == 2 + 200 * 1024 for d in oversized)  # the original bytes, kept
        # Nothing crashed: no child was restarted, and a real run still goes through.
        assert {n: c.restarts for n, c in stack.children.items() if c.restarts} == {}
        run_ids = produce_requests(s, sample_requests(1))
        (row,) = eventually(lambda: ended(s, run_ids), timeout=60, what="a normal run after the poison")
        assert row.status == "completed"


def _jira_command(run_id: str, key: str) -> ToolCommand:
    return ToolCommand(
        run_id=run_id,
        command_id=new_id(),
        decision_id=new_id(),
        tool="jira",
        step="jira",
        arguments={"key": key, "name": f"Project {key}", "lead_email": "lead@example.io"},
        deadline_at=now() + timedelta(seconds=60),
    )


def test_only_signed_commands_reach_a_tool_and_an_old_key_still_does(settings: Settings, tmp_path: Path) -> None:
    """Anyone who can write a command topic can produce a command; only the pipeline can sign one. The
    jira tool runs from a two-key file (mid-rotation): a command signed with the old key is executed,
    and an unsigned one, one signed with a key the tool does not know, and one whose arguments were
    altered after signing are dead-lettered ``unauthenticated`` without the sandbox hearing of them."""
    keys_file = tmp_path / "command-keys"
    keys_file.write_text(TEST_COMMAND_KEYS + "\n")
    keys_file.chmod(0o600)
    rotated = settings.model_copy(update={"command_keys": SecretStr(""), "command_keys_file": keys_file})
    current = parse_keys(TEST_COMMAND_KEYS, "test keys")
    old = parse_keys(" ".join(TEST_OLD_KEY), "the old key")
    rogue = parse_keys("rogue " + "r" * 64, "a rogue key")
    # The decision processor signs a command with its tool's key (streamagent.authn.tool_keys).
    accepted = sign(_jira_command("run-old-key", "ROTATE1"), tool_keys(old, "jira"))
    forged = {
        "unsigned": _jira_command("run-unsigned", "FORGE1"),
        "unknown key": sign(_jira_command("run-rogue", "FORGE2"), rogue),
        "altered": sign(_jira_command("run-altered", "FORGE3"), tool_keys(current, "jira")).model_copy(
            update={"arguments": {"key": "EVIL1", "name": "Evil", "lead_email": "evil@example.io"}}
        ),
    }
    with Stack(rotated, tools=("jira",), processors=()) as stack:
        s = stack.settings
        assert s.command_keys_file == keys_file  # the children read the file they were given
        # The accepted command's decision, as the decision processor records it (else it is stale).
        record_decision(s, accepted.run_id, 0, accepted.decision_id, step="jira")
        producer = Producer({"bootstrap.servers": s.bootstrap_servers})
        for command in [*forged.values(), accepted]:
            producer.produce(s.topic(command_topic("jira")), key=command.run_id.encode(), value=codec.encode(command))
        assert producer.flush(10) == 0

        def refused() -> dict[str, str] | None:
            letters = [d for d in read_dead_letters(s, reason="unauthenticated") if d.processor == "tool.jira"]
            by_run = {codec.decode(d.value or b"").run_id: d.error for d in letters}
            return by_run if len(by_run) >= len(forged) else None

        refusals = eventually(refused, timeout=60, what="every forged command dead-lettered")
        results = eventually(
            lambda: [codec.decode(m.value()) for m in read_topic(s, s.topic(TOOL_RESULTS))],
            timeout=60,
            what="the old-key command's result",
        )
        sandbox = SandboxClient(s.sandbox_url)
        effects = sandbox.effects()
        requests = sandbox.stats()["jira"]["requests"]
        assert {n: c.restarts for n, c in stack.children.items() if c.restarts} == {}  # nothing crashed

    assert refusals["run-unsigned"].startswith("unsigned")
    assert refusals["run-rogue"].startswith("signed with unknown key 'rogue'")
    assert refusals["run-altered"].startswith("signature does not match")
    assert [(r.run_id, r.status) for r in results] == [("run-old-key", ToolStatus.succeeded)]
    # The sandbox records every call it gets: exactly one, the accepted command's.
    assert [(e.api, e.run_id) for e in effects] == [("jira", "run-old-key")]
    assert requests == 1


def test_dlq_replay_puts_letters_back_after_the_fix(settings: Settings) -> None:
    """An oversized request is dead-lettered; after the limit is raised, replay runs it to completion."""
    request = sample_requests(1)[0].model_copy(update={"labels": {f"k{i}": "v" * 100 for i in range(1000)}})
    strict = settings.model_copy(update={"max_event_bytes": 64 * 1024})
    with Stack(strict) as stack:
        s = stack.settings
        produce_requests(s, [request])
        eventually(
            lambda: {d.processor for d in read_dead_letters(s, reason="oversized")} >= {"intake"},
            timeout=60,
            what="request dead-lettered by intake",
        )
        assert queries.run(s, request.run_id) is None
    with Stack(settings) as stack:  # the fix: the default, larger limit; same topics and groups
        s = stack.settings
        letters = [d for d in read_dead_letters(s, reason="oversized") if d.processor == "intake"]
        assert len(letters) == 1 and letters[0].source_topic == s.topic(RUN_REQUESTS)
        assert replay(s, letters) == 1
        (row,) = eventually(lambda: ended(s, [request.run_id]), timeout=60, what="replayed run ended")
        assert row.status == "completed"


def test_a_lost_command_is_redriven_and_the_run_completes(settings: Settings) -> None:
    settings = settings.model_copy(update={"redrive_check_s": 1.0})
    with Stack(settings, tools=("enrich", "draft", "email", "slack")) as stack:
        s = stack.settings
        # A jira member that is announced but consumes nothing: the commands are dispatched and lost.
        ghost = Jira.declaration(member_id="ghost", at_ms=now_ms(), started_at_ms=now_ms(), lease_ms=600_000)
        registry = make_producer(s)
        registry.produce(s.topic(TOOL_REGISTRY), key=ghost.key(), value=ghost.encode())
        assert registry.flush(10) == 0
        run_ids = produce_requests(s, sample_requests(3))
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            eventually(
                lambda: (
                    conn.execute("SELECT count(*) FROM decisions WHERE step='jira' AND action='dispatch'").fetchone()[0]
                    == 3
                ),
                timeout=60,
                what="jira commands issued",
            )
        # The three jira commands are lost before any jira tool saw them.
        assert skip_to_end(s, s.topic(command_topic("jira")), "tool.jira") == 3
        stack.add_tool("jira")
        rows = eventually(lambda: ended(s, run_ids), timeout=90, what="runs completed after the re-drive")
        assert Counter(r.status for r in rows) == {"completed": 3}
        assert_one_effect_per_run_and_step(SandboxClient(s.sandbox_url), run_ids)


def test_an_abandoned_run_is_escalated_and_its_jira_project_closed(settings: Settings) -> None:
    warm_up, later = sample_requests(2)
    with Stack(settings) as stack:
        s = stack.settings
        # A first run to completion: every consumer group has joined before the 4 s deadline starts,
        # so enrich and jira surely succeed in time on a slow machine too.
        produce_requests(s, [warm_up])
        eventually(lambda: ended(s, [warm_up.run_id]), timeout=60, what="warm-up run ended")
        sandbox = SandboxClient(s.sandbox_url)
        sandbox.set_faults("email", FaultSpec(down=True))  # the run cannot finish in time
        # The deadline counts from the request's occurred_at, so the request is made now.
        request = later.model_copy(update={"deadline_s": 4.0, "occurred_at": now()})
        produce_requests(s, [request])
        (row,) = eventually(lambda: ended(s, [request.run_id]), timeout=60, what="run ended")
        assert row.status == "escalated" and "deadline" in (row.reason or "")

        def undone() -> list[object]:
            return [e for e in sandbox.effects(api="jira") if e.op == "delete"]

        (delete,) = eventually(undone, timeout=60, what="jira project closed")
        created = [e for e in sandbox.effects(api="jira") if e.op == "create" and e.run_id == request.run_id]
        assert len(created) == 1 and created[0].response["key"] in str(delete.request) + str(delete.response)

        def decided() -> list[str]:
            timeline = queries.timeline(s, request.run_id)
            return [e.payload["action"] for e in timeline if e.type == "DecisionRecorded"]

        # The projection may still be copying the undo's events when the effect is already visible.
        eventually(lambda: decided()[-2:] == ["escalate", "compensate"], timeout=30, what="undo in the timeline")
        assert decided().count("compensate") == 1
        assert [e for e in sandbox.effects(api="email") if e.run_id == request.run_id] == []


def test_hangs_latency_and_a_burst_of_failures_are_ridden_out(settings: Settings) -> None:
    """Calls that hang past the client timeout are abandoned and retried under the same key."""
    settings = settings.model_copy(update={"tool_timeout_s": 0.5})
    with Stack(settings) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        for api in APIS:
            sandbox.set_faults(api, FaultSpec(hang_rate=0.2, hang_s=2.0, latency_ms=30, fail_next=3))
        run_ids = produce_requests(s, sample_requests(10))
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="10 runs ended")
        assert Counter(r.status for r in rows) == {"completed": 10}
        assert_one_effect_per_run_and_step(sandbox, run_ids)
        faults = {api: sandbox.stats()[api]["faults"] for api in APIS}
        assert all(f["fail_next"] == 3 for f in faults.values())
        assert sum(f["hang"] for f in faults.values()) > 0


def test_lost_responses_are_retried_under_the_same_key_without_a_second_effect(settings: Settings) -> None:
    """The API did the work but the answer never came back: the retry must not do it again."""
    with Stack(settings) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        for api in ("jira", "email"):
            sandbox.set_faults(api, FaultSpec(lost_response_rate=0.3))
        run_ids = produce_requests(s, sample_requests(20))
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="20 runs ended")
        assert Counter(r.status for r in rows) == {"completed": 20}
        assert_one_effect_per_run_and_step(sandbox, run_ids)
        stats = sandbox.stats()
        lost = {api: stats[api]["faults"]["lost_response"] for api in ("jira", "email")}
        replayed = {api: stats[api]["replayed"] for api in ("jira", "email")}
        # Every lost answer was followed by a retry that the API recognised by its key.
        assert sum(lost.values()) > 0 and replayed == lost
        print(f"\n[lost responses] {lost} answers lost after the effect; {replayed} retries replayed by key")
