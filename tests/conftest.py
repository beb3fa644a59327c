"""Shared fixtures. One real broker and one real PostgreSQL per session; isolation per test.

Where a Docker engine answers, testcontainers' Kafka and PostgreSQL are used instead of the
embedded ones (``STREAMAGENT_TEST_BACKEND=containers``); both are real either way.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from streamagent.config import Settings
from streamagent.embedded import EmbeddedBroker, EmbeddedPostgres


def _containers() -> tuple[str, str, list[object]]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    kafka = KafkaContainer().with_kraft().start()
    pg = PostgresContainer("postgres:16", driver=None).start()
    return kafka.get_bootstrap_server(), pg.get_connection_url(), [kafka, pg]


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if os.environ.get("STREAMAGENT_TEST_BACKEND") == "containers":
        bootstrap, url, handles = _containers()
        yield {"bootstrap": bootstrap, "database_url": url, "postgres": None}
        for h in handles:
            h.stop()  # type: ignore[attr-defined]
        return
    base = tmp_path_factory.mktemp("infra")
    broker = EmbeddedBroker(base / "broker").start()
    postgres = EmbeddedPostgres(base / "postgres").start()
    yield {"bootstrap": broker.bootstrap_servers, "database_url": postgres.url, "postgres": postgres}
    postgres.stop()
    broker.stop()


@pytest.fixture
def settings(infra: dict[str, object], tmp_path: Path) -> Settings:
    """Settings for one test: its own topic prefix, consumer groups and database."""
    tag = uuid.uuid4().hex[:10]
    postgres = infra["postgres"]
    if isinstance(postgres, EmbeddedPostgres):
        url = postgres.create_database(f"t_{tag}")
    else:
        import psycopg

        base_url = str(infra["database_url"])
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE t_{tag}")
        url = base_url.rsplit("/", 1)[0] + f"/t_{tag}"
    return Settings(
        bootstrap_servers=str(infra["bootstrap"]),
        database_url=url,
        topic_prefix=f"t{tag}.",
        partitions=4,
        data_dir=tmp_path / "data",
        log_format="json",
    )


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """``streamagent.cli.main`` configures logging for a process; in-process CLI tests must not leak it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
