"""PostgreSQL killed (kill -9) with runs in flight and started again 10 s later on the same data dir.

An outage is not a poison message: every process waits it out and reconnects, nothing is
dead-lettered, no child crashes, no effect happens twice, and every run ends (escalated with the
reason if its deadline passed during the outage). Each stack here has its own embedded PostgreSQL
(``database_url=""``), so killing it leaves the session's shared one alone.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import psycopg
import pytest
from helpers import ended, eventually
from streamagent.tools.sandbox import FaultSpec, SandboxClient

from streamagent import codec
from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import now
from streamagent.kafka import admin, create_topics, group_offsets
from streamagent.kafka import producer as make_producer
from streamagent.metrics import health, scrape
from streamagent.runtime import Batch, ConsumerRuntime
from streamagent.submit import produce_requests
from streamagent.topics import DEAD_LETTERS, RUN_EVENTS, TopicSpec

pytestmark = pytest.mark.integration

APIS = ("enrich", "jira", "email", "slack")
OUTAGE_S = 10.0  # the outage being simulated, not a wait for anything
WATCHED = ("processor-decision", "processor-projection", "tool-enrich", "tool-jira", "tool-email", "tool-slack")


def _own_postgres(settings: Settings) -> Settings:
    # Slow APIs keep many runs mid-flight when PostgreSQL dies.
    return settings.model_copy(update={"database_url": "", "tool_max_in_flight": 16})


def _ports(s: Settings) -> dict[str, int]:
    folder = s.data_dir / "metrics"
    found = eventually(
        lambda: all((folder / f"{n}.port").exists() for n in WATCHED), timeout=30, what="metrics endpoints"
    )
    assert found
    return {n: int((folder / f"{n}.port").read_text()) for n in WATCHED}


def _postgres_down_in(ports: dict[str, int]) -> set[str]:
    """The processes whose metrics say PostgreSQL is down."""
    down = set()
    for name, port in ports.items():
        process = name.removeprefix("processor-").replace("tool-", "tool.")
        if scrape(port, "streamagent_dependency_up", {"process": process, "dependency": "postgres"}) == 0:
            down.add(name)
    return down


def _outage(stack: Stack, ports: dict[str, int], crash: str | None = None) -> tuple[set[str], float]:
    """kill -9 PostgreSQL, keep it down for OUTAGE_S, start it again on the same data dir. ``crash``:
    a child also killed during the outage, so that the supervisor starts it while PostgreSQL is down.

    Returns the processes that reported the outage in their metrics, and the restart time."""
    assert stack.postgres is not None
    url = stack.postgres.url
    stack.postgres.kill()
    killed = time.monotonic()
    reported: set[str] = set()
    if crash is not None:
        old = stack.kill(crash)
        eventually(lambda: stack.children[crash].pid != old, timeout=5, what=f"{crash} restarted")
        ports = {n: p for n, p in ports.items() if n != crash}  # its endpoint went with it
    while time.monotonic() - killed < OUTAGE_S:  # the outage itself; metrics are sampled meanwhile
        down = _postgres_down_in(ports)
        for name in down:  # the health endpoint says the same
            assert health(ports[name])["status"] == "degraded"
        reported |= down
        time.sleep(0.5)
    # The stack's supervisor starts it again once it has been down OUTAGE_S (infra_restart_delay_s).
    pg = stack.postgres
    eventually(lambda: stack.infra_restarts.get("postgres") == 1 and pg.pid is not None, timeout=60, what="restart")
    assert pg.url == url  # same socket: running processes reconnect to it
    return reported, time.monotonic()


def _no_duplicate_effects(sandbox: SandboxClient) -> Counter[tuple[str, str, str]]:
    per = Counter((e.run_id, e.api, e.op) for e in sandbox.effects())
    duplicated = {k: n for k, n in per.items() if n > 1}
    assert not duplicated, f"duplicated effects: {duplicated}"
    return per


def _after_the_outage(stack: Stack, s: Settings, ports: dict[str, int], crashed: str | None = None) -> None:
    assert read_dead_letters(s) == [], "an outage dead-lettered messages"
    restarts = {n: c.restarts for n, c in stack.children.items() if c.restarts}
    assert restarts == ({crashed: 1} if crashed else {}), "a process died of the outage"
    ports = {n: p for n, p in ports.items() if n != crashed}  # a restarted process has a new endpoint
    eventually(lambda: not _postgres_down_in(ports), timeout=30, what="every process sees PostgreSQL up again")
    assert all(health(port)["status"] == "ok" for port in ports.values())


def test_postgres_killed_mid_flight_every_run_completes_once(settings: Settings) -> None:
    with Stack(_own_postgres(settings), infra_restart_delay_s=OUTAGE_S) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        for api in APIS:
            sandbox.set_faults(api, FaultSpec(latency_ms=150 if api == "jira" else 40))
        ports = _ports(s)
        started = time.monotonic()
        run_ids = produce_requests(s, sample_requests(150))
        eventually(lambda: len(sandbox.effects()) >= 100, timeout=60, what="runs under way")
        # tool-email is also killed during the outage: restarted while PostgreSQL is down, it waits.
        reported, restarted = _outage(stack, ports, crash="tool-email")
        in_flight = 150 * len(APIS) - len(sandbox.effects())
        assert in_flight > 100, "too little work left at the kill to prove anything"
        assert reported, "no process reported the outage in streamagent_dependency_up"
        rows = eventually(lambda: ended(s, run_ids), timeout=90, interval=0.5, what="150 runs ended")
        recovered = time.monotonic() - restarted
        assert Counter(r.status for r in rows) == {"completed": 150}
        _no_duplicate_effects(sandbox)
        per_step = Counter((e.run_id, e.api) for e in sandbox.effects())
        missing = [(r, a) for r in run_ids for a in APIS if per_step[(r, a)] != 1]
        assert not missing, f"not exactly one effect: {missing[:10]}"
        _after_the_outage(stack, s, ports, crashed="tool-email")
        print(
            f"\n[postgres outage] {in_flight} effects still to do at the kill; {OUTAGE_S:.0f}s outage;"
            f" all 150 completed {recovered:.1f}s after the restart ({time.monotonic() - started:.1f}s in all);"
            f" outage reported by {sorted(reported)}; 0 dead letters, 0 duplicates"
        )


def test_runs_whose_deadline_passes_during_the_outage_end_escalated(settings: Settings) -> None:
    with Stack(_own_postgres(settings), infra_restart_delay_s=OUTAGE_S) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        for api in APIS:
            sandbox.set_faults(api, FaultSpec(latency_ms=300 if api == "jira" else 40))
        ports = _ports(s)
        warm_up = sample_requests(1)
        produce_requests(s, warm_up)  # every consumer group has joined before the deadlines start
        eventually(lambda: ended(s, [warm_up[0].run_id]), timeout=60, what="warm-up run ended")
        deadline_s = 6.0
        requests = [r.model_copy(update={"deadline_s": deadline_s, "occurred_at": now()}) for r in sample_requests(60)]
        run_ids = produce_requests(s, requests)
        submitted = time.monotonic()
        eventually(lambda: len(sandbox.effects()) >= 30, timeout=30, what="runs under way")
        assert time.monotonic() - submitted < deadline_s, "too slow to kill PostgreSQL before the deadline"
        reported, restarted = _outage(stack, ports)  # outlasts every run's deadline
        assert reported
        rows = eventually(lambda: ended(s, run_ids), timeout=90, interval=0.5, what="60 runs ended")
        recovered = time.monotonic() - restarted
        statuses = Counter(r.status for r in rows)
        assert set(statuses) <= {"completed", "escalated"}, statuses
        assert statuses["escalated"] > 0, statuses
        for row in rows:
            if row.status == "escalated":
                assert "deadline" in (row.reason or ""), row
        _no_duplicate_effects(sandbox)
        _after_the_outage(stack, s, ports)
        print(
            f"\n[postgres outage past deadlines] {dict(statuses)} {recovered:.1f}s after the restart"
            f" ({time.monotonic() - submitted:.1f}s after submitting); 0 dead letters, 0 duplicates"
        )


def test_sandbox_unresponsive_for_ten_seconds_every_run_completes_once(settings: Settings) -> None:
    """The SaaS APIs stop answering (the sandbox is frozen with SIGSTOP, so it keeps its record of
    effects): calls time out, are retried under the same idempotency key, and nothing is lost."""
    settings = settings.model_copy(update={"tool_timeout_s": 1.0, "tool_max_in_flight": 16})
    with Stack(settings) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        for api in APIS:
            sandbox.set_faults(api, FaultSpec(latency_ms=100 if api == "jira" else 20))
        ports = _ports(s)
        run_ids = produce_requests(s, sample_requests(40))
        eventually(lambda: len(sandbox.effects()) >= 20, timeout=60, what="runs under way")
        frozen = stack.children["sandbox"].pid
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        reported: set[str] = set()
        try:
            while time.monotonic() - stopped < OUTAGE_S:  # the outage itself; metrics sampled meanwhile
                for name, port in ports.items():
                    process = name.replace("tool-", "tool.")
                    if scrape(port, "streamagent_dependency_up", {"process": process, "dependency": "sandbox"}) == 0:
                        reported.add(name)
                time.sleep(0.5)
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert reported, "no tool reported the sandbox outage"
        rows = eventually(lambda: ended(s, run_ids), timeout=90, interval=0.5, what="40 runs ended")
        assert Counter(r.status for r in rows) == {"completed": 40}
        per_step = Counter((e.run_id, e.api) for e in sandbox.effects())
        assert all(per_step[(r, a)] == 1 for r in run_ids for a in APIS), "an effect missing or repeated"
        assert read_dead_letters(s) == []
        print(f"\n[sandbox outage] 40/40 completed, 0 duplicates; outage reported by {sorted(reported)}")


def test_a_processor_waiting_out_an_outage_keeps_its_place_in_its_group(settings: Settings) -> None:
    """An outage longer than max.poll.interval.ms: the runtime keeps polling (partitions paused), so it
    is not thrown out of its group; the batch is handled once when the database is back, and committed."""
    create_topics(settings, [TopicSpec(RUN_EVENTS), TopicSpec(DEAD_LETTERS)])
    requests = sample_requests(10)
    producer = make_producer(settings)  # straight onto the topic this runtime reads (no pipeline here)
    for r in requests:
        producer.produce(settings.topic(RUN_EVENTS), key=r.run_id.encode(), value=codec.encode(r))
    assert producer.flush(10) == 0
    run_ids = [r.run_id for r in requests]
    handled: Counter[str] = Counter()
    outage_s = 7.0  # more than twice max.poll.interval.ms below
    first_call: list[float] = []

    def handler(batch: Batch) -> None:
        first_call.append(time.monotonic())
        if time.monotonic() - first_call[0] < outage_s:
            raise psycopg.OperationalError("connection failed: the database system is starting up")
        for item in batch:
            handled[item.event.run_id] += 1  # type: ignore[attr-defined]

    runtime = ConsumerRuntime(
        settings,
        "keepalive",
        [settings.topic(RUN_EVENTS)],
        handler,
        dependencies=("kafka", "postgres"),
        consumer_config={"max.poll.interval.ms": 3000, "session.timeout.ms": 2000, "heartbeat.interval.ms": 500},
    )
    thread = threading.Thread(target=runtime.run, name="keepalive-runtime")
    thread.start()
    try:
        eventually(lambda: set(handled) == set(run_ids), timeout=60, what="every message handled")
        group = settings.group("keepalive")
        partitions = [(settings.topic(RUN_EVENTS), p) for p in range(settings.partitions)]

        def committed() -> bool:
            offsets = group_offsets(admin(settings), group, partitions)
            return sum(max(o, 0) for o in offsets.values()) == len(run_ids)

        eventually(committed, timeout=30, what="the batch committed by the member that handled it")
    finally:
        runtime.stop()
        thread.join(20)
    assert time.monotonic() - first_call[0] >= outage_s and len(first_call) > 3
    assert set(handled.values()) == {1}, "a message was handled twice (the member lost its partitions)"
    assert read_dead_letters(settings) == []
