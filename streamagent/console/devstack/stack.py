"""The embedded stack: broker, PostgreSQL, sandbox and every processor and tool, supervised.

``Stack`` starts whatever the settings leave unset (an empty bootstrap servers string starts the
embedded broker, and so on), runs each processor and tool as its own OS process, and restarts a
child that dies, with backoff. ``streamagent up``, ``streamagent demo`` and the integration tests
all use it, so the tests exercise the same wiring a user runs.
"""

from __future__ import annotations

import ctypes
import getpass
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil

from streamagent import db
from streamagent.approval import load_approval_keys
from streamagent.authn import INTAKE, ROLE_KEYS_FILE_VAR, issue, operator_keys_path, operator_role, tool_role
from streamagent.config import Settings, child_environ
from streamagent.console.devstack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, pid_alive
from streamagent.console.devstack.stackfile import (
    ADDRESSES,
    LOCK_FILE,
    STACK_FILE,
    StackLock,
    StackRunning,
    discover,
    read_stack_file,
    running_pid,
)
from streamagent.kafka import create_topics
from streamagent.policy import Policy, load_policy
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.processors.projection.schema import SCHEMA as PROJECTION_SCHEMA
from streamagent.signing import create_key_file, load_keys
from streamagent.tools.sdk.schema import SCHEMA as LEDGER_SCHEMA
from streamagent.topics import all_topics

log = logging.getLogger(__name__)

__all__ = [
    "ADDRESSES",
    "LOCK_FILE",
    "PROCESSORS",
    "STACK_FILE",
    "Child",
    "Stack",
    "StackLock",
    "StackRunning",
    "StackStartError",
    "discover",
    "last_error_line",
    "read_stack_file",
    "running_pid",
]

PROCESSORS = ("intake", "memory", "state", "decision", "projection")
# A child that died this many times in a row, each soon after it started, is crash-looping.
CRASH_LOOP_RESTARTS = 3


class StackStartError(RuntimeError):
    """The stack could not start; the message says which part and why."""


# -- child processes die with their parent -------------------------------------------------------
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when its parent dies, even by ``kill -9``, so a restarted
    ``up`` never competes with orphans of the one before.

    Linux ties this to the *thread* that forked the child, not the process: start children only from
    threads that live as long as the stack (the main thread, the supervisor), never from a short-lived
    helper thread, or they get SIGTERM when that thread ends."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _stop_leftover(pid: int, create_time: object, what: str, report: Callable[[str], None] | None) -> None:
    if pid <= 0 or create_time is None:
        return
    try:
        proc = psutil.Process(pid)
        if proc.create_time() != create_time:
            return  # the pid now belongs to another process
        proc.terminate()
        try:
            proc.wait(5)
        except psutil.TimeoutExpired:
            proc.kill()
    except psutil.Error:
        return
    message = f"stopped the {what} (pid {pid}) left running by a stack that crashed"
    log.warning(message)
    if report is not None:
        report(message)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_ERROR_WORDS = re.compile(r"error|exception|fatal|panic|traceback|refused|denied|cannot|failed", re.IGNORECASE)


def last_error_line(path: Path, since: int = 0, limit: int = 64 * 1024, width: int = 300) -> str:
    """The most telling line a child wrote to its log since byte ``since``: the last error record of a
    JSON log (with its exception's last line), else the last line that reads like an error (a
    traceback's final line), else the last line."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(since, size - limit))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    found = ""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                if str(record.get("level", "")).lower() in ("error", "critical"):
                    exc = str(record.get("exc") or "").strip().splitlines()
                    msg = str(record.get("msg", ""))
                    found = f"{msg}: {exc[-1]}" if exc else msg
                    break
                continue
        if not line[0].isspace() and _ERROR_WORDS.search(line) and not line.startswith("Traceback"):
            found = line
            break
    if not found and lines:
        found = lines[-1]
    found = found.strip()
    return found if len(found) <= width else found[: width - 1] + "…"


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
    last_exit: int | None = None
    last_error: str = ""
    log_offset: int = 0
    # How its crashes since it last ran a while (or was stopped) ended: what a crash loop reports.
    crashes: list[str] = field(default_factory=list)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.env["STREAMAGENT_GROUP_INSTANCE_ID"] = f"{self.env.get('STREAMAGENT_TOPIC_PREFIX', '')}{self.name}"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.log_offset = self._log.tell()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C in the terminal reaches only the supervisor, which then
            # stops the children in order instead of racing them.
            process_group=0,
            preexec_fn=_die_with_parent(os.getpid()),  # prctl only: takes no lock between fork and exec
        )
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


# Every layer's tables, created before any process starts so that readers (``runs``, ``show``) find them.
SCHEMAS = (PROJECTION_SCHEMA, DECISION_SCHEMA, LEDGER_SCHEMA)


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamagent.console.cli", *args]


class UnknownTool(ValueError):
    """``STREAMAGENT_STACK_TOOLS`` names a tool the tools package does not provide."""


def stack_tools(settings: Settings) -> tuple[str, ...]:
    """The tools a stack starts: ``settings.stack_tools`` if given ("all": every tool of the tools
    package), else the tools the default workflow uses, in the order it first uses them."""
    from streamagent.events import DEFAULT_WORKFLOW
    from streamagent.processors.workflow import load_workflows
    from streamagent.tools import builtin_tools

    known = builtin_tools()
    wanted = [t.strip() for t in settings.stack_tools.split(",") if t.strip()]
    if wanted == ["all"]:
        return tuple(known)
    if not wanted:
        workflow = load_workflows(settings.workflows_dir).get(DEFAULT_WORKFLOW)
        wanted = list(dict.fromkeys(step.tool for step in workflow.steps)) if workflow else []
        return tuple(t for t in wanted if t in known)
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise UnknownTool(
            f"STREAMAGENT_STACK_TOOLS names {', '.join(unknown)}, which the tools package does not provide;"
            f" known: {', '.join(sorted(known))} (or all)"
        )
    return tuple(dict.fromkeys(wanted))


def command_keys_settings(settings: Settings) -> dict[str, object]:
    """The key settings the stack's children get: the given keys if any, else ``<data dir>/command-keys``,
    created with one random key (mode 0600) on the stack's first start and kept from then on, so commands
    recorded by one run of the stack still verify in the next. The children then get the file's path,
    not the secret, in their environment (keys given inline reach them inline, as given); a tool
    deployed later by hand beside ``up`` finds the same file by default."""
    if settings.command_keys.get_secret_value().strip() or settings.command_keys_file is not None:
        load_keys(settings)  # a key named but unusable: refused here, in one line, before any child starts
        return {}
    path = settings.command_keys_path.resolve()
    if create_key_file(path):
        log.info("created the command signing key file %s", path)
    load_keys(settings)
    return {"command_keys_file": path}


def approval_keys_settings(settings: Settings) -> dict[str, object]:
    """As ``command_keys_settings``, for the approval token keys (``streamagent.approval``): the given
    ones, else ``<data dir>/approval-keys``, created once (mode 0600) and kept. The guard mints tokens
    with its first key and every tool verifies them; a tool refuses to start without one."""
    if settings.approval_keys.get_secret_value().strip() or settings.approval_keys_file is not None:
        load_approval_keys(settings)  # named but unusable: refused here, in one line, before any child starts
        return {}
    path = settings.approval_keys_path.resolve()
    header = "approval token keys: the first signs, every one verifies (README: Governance: what a tool checks)"
    if create_key_file(path, header):
        log.info("created the approval key file %s", path)
    load_approval_keys(settings)
    return {"approval_keys_file": path}


def local_operator() -> str:
    """The identity `up` issues the local operator's key under: the login name, as a role allows it."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # a container's uid with no name: still one operator, named so
        user = "operator"
    name = re.sub(r"[^A-Za-z0-9_.@-]", "-", user or "operator").strip("-.") or "operator"
    return name[:100]


def issue_role_keys(settings: Settings, tools: tuple[str, ...]) -> dict[str, Path]:
    """Write each role's key file under ``<data dir>/keys`` (mode 0600): intake's and each tool's, issued
    again at every start (so they follow a rotation of the pipeline keys), and the local operator's
    once, unless one is there (it may be another person's on a shared machine). The children that sign as
    a role get its file, not the pipeline keys (``STREAMAGENT_ROLE_KEYS_FILE``)."""
    pipeline = load_keys(settings)
    folder = settings.data_dir / "keys"
    paths: dict[str, Path] = {}
    for role in (INTAKE, *(tool_role(t) for t in tools)):
        path = folder / (role.replace(":", "-") + ".keys")
        issue(pipeline, role).write(path)
        paths[role] = path
    operator = operator_keys_path(settings)
    if settings.operator_keys_file is None and not operator.exists():
        issue(pipeline, operator_role(local_operator())).write(operator)
        log.info("issued the operator key %s for %s", operator, local_operator())
    return paths


def check_policies(settings: Settings) -> Policy:
    """The policy files of ``policies_dir``, loaded: a malformed one raises ``PolicyError`` (file, field,
    reason) before anything starts; each process that reads policy checks again at its own start."""
    return load_policy(settings.policies_dir)


class Stack:
    def __init__(
        self,
        settings: Settings,
        *,
        tools: tuple[str, ...] | None = None,
        processors: tuple[str, ...] = PROCESSORS,
        sandbox_faults: dict[str, dict[str, object]] | None = None,
        restart_backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
        report: Callable[[str], None] | None = None,
        infra_restart_delay_s: float = 0.0,
        ui_port: int | None = None,
    ) -> None:
        """``report`` gets one human line per event a user should see on the terminal (a child that
        died, with its last error line); everything is logged either way. ``ui_port``: serve the run
        timeline page on it (0: a free port), as a supervised child like the others; None: no page."""
        self.requested = settings
        self.report = report
        self.settings = settings
        self.tools = tools if tools is not None else stack_tools(settings)
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
        # How long a dead broker or PostgreSQL stays down before the supervisor starts it again (tests
        # hold an outage open with it; 0 restarts at once).
        self.infra_restart_delay_s = infra_restart_delay_s
        self._down_since: dict[str, float] = {}
        self._data_lock: StackLock | None = None
        self.ui_port = ui_port
        self.ui_url = ""
        self.role_keys: dict[str, Path] = {}

    # -- start / stop ----------------------------------------------------------------------------
    def start(self) -> Stack:
        """Start everything, or raise (StackRunning, StackStartError, …) having stopped what was started."""
        if self._data_lock is not None:
            raise RuntimeError("this stack is already started")
        data = self.settings.data_dir.resolve()
        self._data_lock = StackLock(data).acquire()  # before anything else touches the data dir
        try:
            self._start(data)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, data: Path) -> None:
        self._reap_leftovers(data)
        updates: dict[str, object] = {"data_dir": data}
        # First: a missing or malformed key stops the start before anything is started.
        updates.update(command_keys_settings(self.settings.model_copy(update=updates)))
        updates.update(approval_keys_settings(self.settings.model_copy(update=updates)))
        check_policies(self.settings)
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
        create_topics(self.settings, all_topics(self.tools))
        db.migrate(self.settings, *SCHEMAS)
        env = child_environ(self.settings)
        self.role_keys = issue_role_keys(self.settings, self.tools)
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
            self._add(
                Child(
                    f"processor-{name}", cli_argv("processor", name), self._env_of(name), logs / f"processor-{name}.log"
                )
            )
        for name in self.tools:
            self._add(
                Child(f"tool-{name}", cli_argv("tool", name), self._env_of(tool_role(name)), logs / f"tool-{name}.log")
            )
        if self.ui_port is not None:
            host = self.settings.ui_host
            port = self.ui_port or free_port(host)
            self.ui_url = f"http://{host}:{port}"
            self._add(Child("ui", cli_argv("ui", "--host", host, "--port", str(port)), env, logs / "ui.log"))
        for child in self.children.values():
            child.start()
        if sandbox_port is not None:
            sandbox = self.children["sandbox"]
            self._wait_http(self.settings.sandbox_url + "/_sandbox/health", timeout=20, child=sandbox)
        if self.ui_url:
            self._wait_http(self.ui_url + "/api/health", timeout=20, child=self.children["ui"])
        self._write_stack_file()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()

    def _add(self, child: Child) -> None:
        self.children[child.name] = child

    def _env_of(self, role: str) -> dict[str, str]:
        """A child's environment: a child that signs as a role outside the core gets that role's key file."""
        env = child_environ(self.settings)
        path = self.role_keys.get(role)
        if path is not None:
            env[ROLE_KEYS_FILE_VAR] = str(path)
        return env

    def add_tool(self, name: str) -> Child:
        """Deploy one more tool process (its own consumer group) into the running stack."""
        path = self.settings.data_dir / "keys" / f"tool-{name}.keys"
        issue(load_keys(self.settings), tool_role(name)).write(path)
        self.role_keys[tool_role(name)] = path
        env = self._env_of(tool_role(name))
        child = Child(f"tool-{name}", cli_argv("tool", name), env, self.settings.data_dir / "logs" / f"tool-{name}.log")
        with self._lock:
            self._add(child)
            child.start()
        return child

    def add_processor(self, name: str) -> Child:
        """Start a processor again after ``undeploy`` (tests: change what it will read while it is down,
        e.g. rewind its committed offsets, then bring it back as a restart would)."""
        env = self._env_of(name)
        log_path = self.settings.data_dir / "logs" / f"processor-{name}.log"
        child = Child(f"processor-{name}", cli_argv("processor", name), env, log_path)
        with self._lock:
            self._add(child)
            child.start()
        return child

    def undeploy(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one child for good (not restarted): ``SIGTERM`` stops it gracefully, ``SIGKILL`` crashes it."""
        with self._lock:
            child = self.children.pop(name)
        if child.alive() and child.proc is not None and sig != signal.SIGTERM:
            child.proc.send_signal(sig)
        child.stop()

    def stop(self) -> list[str]:
        """Stop everything this stack started; returns what was running when asked to stop. Idempotent."""
        # What runs is read before the supervisor thread ends: a child that thread restarted gets
        # SIGTERM from the kernel when the thread exits (PR_SET_PDEATHSIG is per thread).
        with self._lock:
            running = [c.name for c in self.children.values() if c.alive()]
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        stopped: list[str] = list(running)
        with self._lock:
            for child in self.children.values():
                if child.alive() and child.proc is not None:
                    child.proc.send_signal(signal.SIGTERM)
            for child in self.children.values():
                child.stop()
        if self.postgres is not None:
            if self.postgres.pid is not None:
                stopped.append("postgres")
            self.postgres.stop()
        if self.broker is not None:
            if self.broker.running:
                stopped.append("broker")
            self.broker.stop()
        if self._data_lock is not None:
            # Only the lock holder writes or removes the stack file.
            (self.settings.data_dir / STACK_FILE).unlink(missing_ok=True)
            self._data_lock.release()
            self._data_lock = None
        return stopped

    def force_stop(self) -> list[str]:
        """SIGKILL every process this stack started (a second Ctrl-C), without waiting or locking: safe from a
        signal handler while ``stop`` is in progress. PostgreSQL gets an immediate shutdown (SIGQUIT), which
        is crash-safe. The data dir lock dies with this process."""
        killed = []
        for child in list(self.children.values()):
            proc = child.proc
            if proc is not None and proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(child.name)
                except ProcessLookupError:
                    pass
        for name, pid, sig in (
            ("broker", self.broker.pid if self.broker is not None else None, signal.SIGKILL),
            ("postgres", self.postgres.pid if self.postgres is not None else None, signal.SIGQUIT),
        ):
            if pid is not None:
                try:
                    os.kill(pid, sig)
                    killed.append(name)
                except ProcessLookupError:
                    pass
        if self._data_lock is not None:
            (self.settings.data_dir / STACK_FILE).unlink(missing_ok=True)
        return killed

    def close(self) -> None:
        self.stop()

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
        if self.broker is not None and self._due("broker", not self.broker.running):
            log.warning("embedded broker died; restarting it on %s", self.broker.bootstrap_servers)
            self.infra_restarts["broker"] = self.infra_restarts.get("broker", 0) + 1
            started = time.monotonic()
            try:
                self.broker.restart()
            except Exception:  # keep supervising; the next round tries again
                log.exception("embedded broker did not restart; trying again")
            else:
                self._report_infra("broker", f"restarted on {self.broker.bootstrap_servers}", started)
        pg = self.postgres
        if pg is not None and self._due("postgres", pg.pid is None or not pid_alive(pg.pid)):
            log.warning("embedded postgres died; restarting it in %s", pg.data_dir)
            self.infra_restarts["postgres"] = self.infra_restarts.get("postgres", 0) + 1
            started = time.monotonic()
            try:
                pg.stop()  # forgets the dead server's handle, so that start() initialises afresh
                pg.start()
            except Exception:  # keep supervising; the next round tries again
                log.exception("embedded postgres did not restart; trying again")
            else:
                self._report_infra("postgres", f"restarted in {pg.data_dir}", started)

    def _due(self, name: str, dead: bool) -> bool:
        """Whether a dead dependency has been down long enough to be started again."""
        if not dead or self._stop.is_set():
            self._down_since.pop(name, None)
            return False
        since = self._down_since.setdefault(name, time.monotonic())
        if time.monotonic() - since < self.infra_restart_delay_s:
            return False
        del self._down_since[name]
        return True

    def _report_infra(self, name: str, what: str, started: float) -> None:
        line = f"embedded {name} died; {what} in {time.monotonic() - started:.1f}s"
        log.warning(line)
        if self.report is not None:
            self.report(line)

    def _check(self, child: Child) -> None:
        if child.proc is None or child.alive():
            return
        now = time.monotonic()
        if child.next_start == 0.0:
            code = child.proc.returncode
            # Stopped, not crashed: SIGTERM or SIGINT from someone else (a rolling restart), or a clean
            # exit. It is started again, and never counted towards a crash loop.
            stopped = code in (0, -signal.SIGTERM, -signal.SIGINT)
            # A child that ran a while before dying gets a fresh backoff; a crash loop does not.
            if stopped or now - child.started_at > 30:
                child.restarts = 0
                child.crashes.clear()
            if not stopped:
                child.crashes.append(describe_exit(code))
            delay = min(self.max_backoff_s, self.restart_backoff_s * 2**child.restarts)
            child.next_start = now + delay
            child.last_exit = code
            child.last_error = last_error_line(child.log_path, child.log_offset)
            log.warning(
                "%s %s; restarting in %.1fs",
                child.name,
                "stopped" if stopped else f"exited with {code}",
                delay,
                extra={
                    "child": child.name,
                    "exit_code": code,
                    "restarts": child.restarts,
                    "last_error": child.last_error,
                },
            )
            if self.report is not None:
                ran = f"after {now - child.started_at:.1f}s"
                if stopped:
                    self.report(f"{child.name} stopped ({describe_exit(code)}) {ran} — restarting in {delay:.1f}s")
                else:
                    looping = ""
                    if child.restarts + 1 >= CRASH_LOOP_RESTARTS:
                        looping = f" (crash loop: {', '.join(child.crashes[-CRASH_LOOP_RESTARTS:])})"
                    self.report(
                        f"{child.name} {describe_exit(code)} {ran}{looping}:"
                        f" {child.last_error or '(its log is empty)'} — restarting in {delay:.1f}s;"
                        f" log: {child.log_path}"
                    )
        if now >= child.next_start:
            child.restarts += 1
            child.next_start = 0.0
            child.stop()
            child.start()

    def failing(self) -> str | None:
        """Why the stack cannot make progress (a child that keeps crashing), or None."""
        with self._lock:
            for child in self.children.values():
                if child.restarts >= CRASH_LOOP_RESTARTS and not child.alive() and child.crashes:
                    ends = ", ".join(child.crashes[-CRASH_LOOP_RESTARTS:])
                    return (
                        f"{child.name} keeps crashing ({child.restarts} restarts, last {ends}):"
                        f" {child.last_error or '(its log is empty)'}; log: {child.log_path}"
                    )
        return None

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
    def _wait_http(url: str, timeout: float, child: Child | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child is not None and child.proc is not None and child.proc.poll() is not None:
                error = last_error_line(child.log_path, child.log_offset)
                raise StackStartError(
                    f"{child.name} {describe_exit(child.proc.returncode)} during start: {error}; log: {child.log_path}"
                )
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # readiness probe interval, not synchronisation
        raise StackStartError(f"{url} did not answer within {timeout}s")

    def _write_stack_file(self) -> None:
        info: dict[str, object] = {
            "bootstrap_servers": self.settings.bootstrap_servers,
            "database_url": self.settings.database_url,
            "sandbox_url": self.settings.sandbox_url,
            "topic_prefix": self.settings.topic_prefix,
            "pid": os.getpid(),
        }
        broker_pid = self.broker.pid if self.broker is not None else None
        if broker_pid is not None:
            # The broker runs in its own session, so it outlives a `kill -9` of this process; the next
            # stack in this data dir stops it (see _reap_leftovers).
            info["broker"] = {"pid": broker_pid, "create_time": _create_time(broker_pid)}
        path = self.settings.data_dir / STACK_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(path)  # readers never see half a file

    def _reap_leftovers(self, data: Path) -> None:
        """We hold the lock, so a stack file here is stale: its stack died without stopping. Stop the
        embedded broker it left running, if that very process (same pid *and* start time) still runs."""
        path = data / STACK_FILE
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(info, dict):
            info = {}
        pid = info.get("pid", "?")
        message = f"the last stack in {data} (pid {pid}) did not stop cleanly; its stack.json is ignored"
        log.warning(message)
        if self.report is not None:
            self.report(message)
        broker = info.get("broker")
        if isinstance(broker, dict):
            _stop_leftover(int(broker.get("pid", 0)), broker.get("create_time"), "embedded broker", self.report)
        path.unlink(missing_ok=True)
