"""The embedded stack: broker, PostgreSQL, sandbox and every processor and tool, supervised.

``Stack`` starts whatever the settings leave unset (an empty bootstrap servers string starts the
embedded broker, and so on), runs each processor and tool as its own OS process, and restarts a
child that dies, with backoff. ``streamagent up``, ``streamagent demo`` and the integration tests
all use it, so the tests exercise the same wiring a user runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from streamagent import db
from streamagent.config import Settings, to_env
from streamagent.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, pid_alive
from streamagent.kafka import create_topics
from streamagent.topics import TOOLS

log = logging.getLogger(__name__)

PROCESSORS = ("state", "decision", "projection")
STACK_FILE = "stack.json"


@dataclass
class Child:
    """One supervised OS process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.env["STREAMAGENT_GROUP_INSTANCE_ID"] = f"{self.env.get('STREAMAGENT_TOPIC_PREFIX', '')}{self.name}"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()
        log.info("started %s", self.name, extra={"child": self.name, "pid": self.proc.pid})

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamagent.cli", *args]


class Stack:
    def __init__(
        self,
        settings: Settings,
        *,
        tools: tuple[str, ...] = TOOLS,
        processors: tuple[str, ...] = PROCESSORS,
        sandbox_faults: dict[str, dict[str, object]] | None = None,
        restart_backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
    ) -> None:
        self.requested = settings
        self.settings = settings
        self.tools = tools
        self.processors = processors
        self.sandbox_faults = sandbox_faults or {}
        self.restart_backoff_s = restart_backoff_s
        self.max_backoff_s = max_backoff_s
        self.broker: EmbeddedBroker | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.children: dict[str, Child] = {}
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()
        self.infra_restarts: dict[str, int] = {}

    # -- start / stop ----------------------------------------------------------------------------
    def start(self) -> Stack:
        data = self.settings.data_dir.resolve()
        data.mkdir(parents=True, exist_ok=True)
        updates: dict[str, object] = {"data_dir": data}
        if not self.settings.bootstrap_servers:
            self.broker = EmbeddedBroker(
                data / "broker", storage=self.settings.broker_storage, fsync=self.settings.broker_fsync
            ).start()
            updates["bootstrap_servers"] = self.broker.bootstrap_servers
        if not self.settings.database_url:
            self.postgres = EmbeddedPostgres(data / "postgres").start()
            updates["database_url"] = self.postgres.url
        sandbox_port = None
        if not self.settings.sandbox_url:
            sandbox_port = free_port()
            updates["sandbox_url"] = f"http://127.0.0.1:{sandbox_port}"
        self.settings = self.settings.model_copy(update=updates)
        create_topics(self.settings)
        db.migrate(self.settings)
        env = {**os.environ, **to_env(self.settings)}
        logs = data / "logs"
        if sandbox_port is not None:
            faults = [
                arg for api, spec in self.sandbox_faults.items() for arg in ("--fault", f"{api}={json.dumps(spec)}")
            ]
            self._add(
                Child(
                    "sandbox",
                    cli_argv("sandbox", "--port", str(sandbox_port), *faults),
                    env,
                    logs / "sandbox.log",
                )
            )
        for name in self.processors:
            self._add(Child(f"processor-{name}", cli_argv("processor", name), env, logs / f"processor-{name}.log"))
        for name in self.tools:
            self._add(Child(f"tool-{name}", cli_argv("tool", name), env, logs / f"tool-{name}.log"))
        for child in self.children.values():
            child.start()
        if sandbox_port is not None:
            self._wait_http(self.settings.sandbox_url + "/_sandbox/health", timeout=20)
        self._write_stack_file()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        return self

    def _add(self, child: Child) -> None:
        self.children[child.name] = child

    def add_tool(self, name: str) -> Child:
        """Deploy one more tool process (its own consumer group) into the running stack."""
        env = {**os.environ, **to_env(self.settings)}
        child = Child(f"tool-{name}", cli_argv("tool", name), env, self.settings.data_dir / "logs" / f"tool-{name}.log")
        with self._lock:
            self._add(child)
            child.start()
        return child

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        with self._lock:
            for child in self.children.values():
                if child.alive() and child.proc is not None:
                    child.proc.send_signal(signal.SIGTERM)
            for child in self.children.values():
                child.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if self.broker is not None:
            self.broker.stop()
        stack_file = self.settings.data_dir / STACK_FILE
        if stack_file.exists():
            stack_file.unlink()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- supervision -----------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            self._check_dependencies()
            with self._lock:
                for child in self.children.values():
                    self._check(child)

    def _check_dependencies(self) -> None:
        """Restart a dead embedded broker or PostgreSQL in place: same port, same data dir, so the
        processes (which retry through the outage) reconnect to the same address. The broker comes
        back with its journal; PostgreSQL recovers from its WAL."""
        if self.broker is not None and not self.broker.running and not self._stop.is_set():
            log.warning("embedded broker died; restarting it on %s", self.broker.bootstrap_servers)
            self.infra_restarts["broker"] = self.infra_restarts.get("broker", 0) + 1
            try:
                self.broker.restart()
            except Exception:  # noqa: BLE001 - keep supervising; the next round tries again
                log.exception("embedded broker did not restart; trying again")
        pg = self.postgres
        if pg is not None and (pg.pid is None or not pid_alive(pg.pid)) and not self._stop.is_set():
            log.warning("embedded postgres died; restarting it in %s", pg.data_dir)
            self.infra_restarts["postgres"] = self.infra_restarts.get("postgres", 0) + 1
            try:
                pg.stop()  # forgets the dead server's handle, so that start() initialises afresh
                pg.start()
            except Exception:  # noqa: BLE001 - keep supervising; the next round tries again
                log.exception("embedded postgres did not restart; trying again")

    def _check(self, child: Child) -> None:
        if child.proc is None or child.alive():
            return
        now = time.monotonic()
        if child.next_start == 0.0:
            # A child that ran a while before dying gets a fresh backoff; a crash loop does not.
            if now - child.started_at > 30:
                child.restarts = 0
            delay = min(self.max_backoff_s, self.restart_backoff_s * 2**child.restarts)
            child.next_start = now + delay
            log.warning(
                "%s exited with %s; restarting in %.1fs",
                child.name,
                child.proc.returncode,
                delay,
                extra={"child": child.name, "exit_code": child.proc.returncode, "restarts": child.restarts},
            )
        if now >= child.next_start:
            child.restarts += 1
            child.next_start = 0.0
            child.stop()
            child.start()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Kill a child (tests: crash it); the supervisor restarts it. Returns the killed pid."""
        child = self.children[name]
        assert child.proc is not None
        pid = child.proc.pid
        os.kill(pid, sig)
        child.proc.wait(10)
        return pid

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _wait_http(url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # readiness probe interval, not synchronisation
        raise TimeoutError(f"{url} did not answer within {timeout}s")

    def _write_stack_file(self) -> None:
        info = {
            "bootstrap_servers": self.settings.bootstrap_servers,
            "database_url": self.settings.database_url,
            "sandbox_url": self.settings.sandbox_url,
            "topic_prefix": self.settings.topic_prefix,
            "pid": os.getpid(),
        }
        (self.settings.data_dir / STACK_FILE).write_text(json.dumps(info, indent=2))


def discover(settings: Settings) -> Settings:
    """Fill unset addresses from a running ``streamagent up`` in the same data dir, if there is one."""
    path = settings.data_dir / STACK_FILE
    if settings.bootstrap_servers and settings.database_url:
        return settings
    if not path.exists():
        return settings
    info = json.loads(path.read_text())
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return settings  # left behind by a stack that is gone
    updates = {k: info[k] for k in ("bootstrap_servers", "database_url", "sandbox_url") if not getattr(settings, k)}
    return settings.model_copy(update=updates)
