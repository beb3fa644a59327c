"""The embedded stack: broker, PostgreSQL, sandbox and every processor and tool, supervised.

``Stack`` starts whatever the settings leave unset (an empty bootstrap servers string starts the
embedded broker, and so on), runs each processor and tool as its own OS process, and restarts a
child that dies, with backoff. ``streamagent up``, ``streamagent demo`` and the integration tests
all use it, so the tests exercise the same wiring a user runs.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import signal
import socket
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
from streamagent.config import Settings, child_environ, env_name
from streamagent.console.devstack.embedded import (
    EmbeddedBroker,
    EmbeddedPostgres,
    die_with_parent,
    free_port,
)
from streamagent.console.devstack.members import group_of, member_name, parse_members
from streamagent.console.devstack.prefork import ForkedProcess, ForkError, ForkServer
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


# Seconds after a dead member's expiry before its successor starts (see ``Stack._membership_outlives_s``).
# A faust state survivor loads a checkpoint and reads the changelog written since (2-5 s at a 2,000-run
# burst), and a faust successor's join would restart that. A confluent successor joins within the
# survivors' rebalance instead: when the dead member had (we think) led its group, the embedded coordinator
# gave the survivor back only its own partitions at the expiry, and the dead member's waited for the next join
# (jira's kill pause 12.1-13.3 s in three bench/scale.py runs with the successor 2 s later).
_TAKEOVER_S = {"processor-state": 6.0, "": 0.5}


class StackStartError(RuntimeError):
    """The stack could not start; the message says which part and why."""


class PortInUse(StackStartError):
    """A fixed port of the stack is taken; the message names the setting that moves it."""


# The loopback address the broker and the sandbox listen on (the page's is a setting: ui_host).
LOOPBACK = "127.0.0.1"
# How long a started HTTP child (the sandbox, the page) may take to answer its health probe. A readiness
# bound, not a wait: on a loaded 2-core machine a Python process took over 20 s to import and listen.
_READY_S = 60.0


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: a just-stopped server's connections in TIME_WAIT do not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ports_in_use(settings: Settings, ui_port: int | None) -> str | None:
    """One line naming each fixed port the stack would listen on that something else holds, and the
    setting that moves it; None when all are free. Only what the stack starts counts (a broker given
    by STREAMAGENT_BOOTSTRAP_SERVERS needs no port here), and 0 ("a free one") is never taken."""
    wanted = []
    if not settings.bootstrap_servers:
        wanted.append(("the broker", LOOPBACK, settings.broker_port, "broker_port", "0 picks a free one"))
    if not settings.sandbox_url:
        wanted.append(("the sandbox", LOOPBACK, settings.sandbox_port, "sandbox_port", "0 picks a free one"))
    if ui_port:
        wanted.append(("the run timeline page", settings.ui_host, ui_port, "ui_port", "0: no page"))
    problems = [
        f"port {port} for {what} is in use; set {env_name(setting)} to another port ({zero})"
        for what, host, port, setting, zero in wanted
        if port and not _port_is_free(host, port)
    ]
    return "; ".join(problems) or None


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _recorded(pid: int | None) -> dict[str, object] | None:
    """How stack.json names a process: its pid and start time (a pid alone may by now be anyone's)."""
    return None if pid is None else {"pid": pid, "create_time": _create_time(pid)}


def _leftover(entry: object) -> psutil.Process | None:
    """The process a stale stack.json entry names, if that very process (same pid *and* start time) runs."""
    if not isinstance(entry, dict):
        return None
    try:
        proc = psutil.Process(int(entry.get("pid") or 0))
        if entry.get("create_time") is None or proc.create_time() != entry["create_time"]:
            return None  # the pid now belongs to another process
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except (psutil.Error, ValueError, TypeError):
        return None


def _journal_brokers(journal_dir: Path) -> list[psutil.Process]:
    """Journal brokers serving ``journal_dir``, found by their command line: one an older `up` started
    (without a parent-death signal, in its own session) outlives it and is named by no stack.json."""
    found = []
    target = str(journal_dir)
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info.get("cmdline") or []
        if "streamagent.console.devstack.broker" in argv and "--data-dir" in argv:
            index = argv.index("--data-dir") + 1
            if index < len(argv) and str(Path(argv[index]).resolve()) == target:
                found.append(proc)
    return found


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
    proc: subprocess.Popen[bytes] | ForkedProcess | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    last_exit: int | None = None
    last_error: str = ""
    log_offset: int = 0
    # How its crashes since it last ran a while (or was stopped) ended: what a crash loop reports.
    crashes: list[str] = field(default_factory=list)
    # A static group.instance.id (its name): see Stack._member for the one exception.
    static: bool = True
    _log: IO[bytes] | None = field(default=None, repr=False)
    # The stack's fork server, if it runs (prefork.py): a start without paying the imports again.
    forker: ForkServer | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Its own static identity: a restarted member comes back as itself (one per member process).
        static = f"{self.env.get('STREAMAGENT_TOPIC_PREFIX', '')}{self.name}" if self.static else ""
        self.env["STREAMAGENT_GROUP_INSTANCE_ID"] = static
        self.env["STREAMAGENT_INSTANCE_ID"] = self.name
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.log_offset = self._log.tell()
        self.proc = None
        if self.forker is not None:
            try:
                self.proc = self.forker.spawn(self.argv, self.env, self.log_path, title=" ".join(self.argv))
            except ForkError as exc:  # the server remembers it is unusable: later starts fail over at once
                log.warning("fork server: %s; starting %s with exec", exc, self.name, extra={"child": self.name})
        if self.proc is None:
            self.proc = self._exec()
        self.started_at = time.monotonic()
        log.info("started %s", self.name, extra={"child": self.name, "pid": self.proc.pid})

    def _exec(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C in the terminal reaches only the supervisor, which then
            # stops the children in order instead of racing them.
            process_group=0,
            # SIGKILL when `up` dies however it dies: a graceful stop can hang with the broker going down at
            # the same moment (seen: the faust state processor still waiting on a fetch 40 s on), and every
            # process is crash-safe by design (resume, never restart; one effect per command id), so the
            # hard stop loses nothing. The broker (SIGTERM: it flushes its journal) and PostgreSQL (SIGINT:
            # fast shutdown) are stopped gently instead; see embedded.py.
            preexec_fn=die_with_parent(os.getpid(), signal.SIGKILL),  # prctl only: takes no lock between fork and exec
        )

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
    header = "approval token keys: the first signs, every one verifies (docs/governance/tool-checks.md)"
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
        # Members per group (STREAMAGENT_STACK_MEMBERS): refused here, in one line, before anything starts.
        self.members = parse_members(settings.stack_members, processors, self.tools)
        self.sandbox_faults = sandbox_faults or {}
        self.restart_backoff_s = restart_backoff_s
        self.max_backoff_s = max_backoff_s
        self.broker: EmbeddedBroker | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.children: dict[str, Child] = {}
        self._stop = threading.Event()
        # The supervisor thread lives until stop() has stopped everything: a process it restarted has
        # its parent-death signal tied to that thread (PR_SET_PDEATHSIG is per thread), and would
        # otherwise be stopped by the kernel before the processes that depend on it.
        self._released = threading.Event()
        self._parked = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()
        self.infra_restarts: dict[str, int] = {}
        self.forker: ForkServer | None = None
        # How long a dead broker or PostgreSQL stays down before the supervisor starts it again (tests
        # hold an outage open with it; 0 restarts at once).
        self.infra_restart_delay_s = infra_restart_delay_s
        self._infra: dict[str, _Infra] = {}
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
        # After the leftovers of a crashed stack are gone (they held these very ports), before anything
        # starts: a taken port is refused in one line naming its setting, not met as a child's crash loop.
        taken = ports_in_use(self.settings, self.ui_port)
        if taken:
            raise PortInUse(taken)
        updates: dict[str, object] = {"data_dir": data}
        # First: a missing or malformed key stops the start before anything is started.
        updates.update(command_keys_settings(self.settings.model_copy(update=updates)))
        updates.update(approval_keys_settings(self.settings.model_copy(update=updates)))
        check_policies(self.settings)
        if self.settings.stack_prefork:
            # First: it imports what every process needs while the broker and PostgreSQL start.
            self.forker = ForkServer(data / "logs" / "fork-server.log", child_environ(self.settings)).start()
        if not self.settings.bootstrap_servers:
            self.broker = EmbeddedBroker(
                data / "broker",
                host=LOOPBACK,
                port=self.settings.broker_port or None,
                storage=self.settings.broker_storage,
                fsync=self.settings.broker_fsync,
            ).start()
            updates["bootstrap_servers"] = self.broker.bootstrap_servers
        if not self.settings.database_url:
            # Its URL names a unix socket in its data dir: the same at every start, like the fixed ports.
            self.postgres = EmbeddedPostgres(data / "postgres").start()
            updates["database_url"] = self.postgres.url
        sandbox_port = None
        if not self.settings.sandbox_url:
            sandbox_port = self.settings.sandbox_port or free_port(LOOPBACK)
            updates["sandbox_url"] = f"http://{LOOPBACK}:{sandbox_port}"
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
                    cli_argv("sandbox", "--host", LOOPBACK, "--port", str(sandbox_port), *faults),
                    env,
                    logs / "sandbox.log",
                )
            )
        for name in self.processors:
            for index in range(1, self.members[f"processor-{name}"] + 1):
                self._add(self._member(f"processor-{name}", index))
        for name in self.tools:
            for index in range(1, self.members[f"tool-{name}"] + 1):
                self._add(self._member(f"tool-{name}", index))
        if self.ui_port is not None:
            host = self.settings.ui_host
            port = self.ui_port or free_port(host)
            self.ui_url = f"http://{host}:{port}"
            self._add(Child("ui", cli_argv("ui", "--host", host, "--port", str(port)), env, logs / "ui.log"))
        if sandbox_port is not None:
            # First, on its own: with many members per group, a sandbox started among them answered its
            # health check only after 20 s on a busy machine, and the tools need it from their first command.
            sandbox = self.children["sandbox"]
            sandbox.start()
            self._wait_http(self.settings.sandbox_url + "/_sandbox/health", timeout=_READY_S, child=sandbox)
        for child in self.children.values():
            if child.proc is None:
                child.start()
        if self.ui_url:
            self._wait_http(self.ui_url + "/api/health", timeout=_READY_S, child=self.children["ui"])
        self._write_stack_file()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()

    def _add(self, child: Child) -> None:
        child.forker = self.forker
        self.children[child.name] = child

    def _member(self, base: str, index: int) -> Child:
        """Member ``index`` of a processor's or a tool's group (``base``: processor-decision, tool-jira)."""
        kind, _, name = base.partition("-")
        role = name if kind == "processor" else tool_role(name)
        child = member_name(base, index)
        # Static membership only for a group of one. On the embedded broker it breaks groups of several:
        # two faust (aiokafka) state members with static ids never settle (every heartbeat refused, a
        # rejoin every ~7 s, for ever), and a tool member killed with kill -9 and restarted under its
        # static id left its group's rebalance unfinished for minutes, nobody owning the partitions
        # (both measured). Several members join with dynamic membership instead: a killed one is then
        # replaced after its session timeout. A member added to a group of one is dynamic too.
        static = self.members.get(base, 1) == 1 and index == 1
        return Child(
            child,
            cli_argv(kind, name),
            self._env_of(role),
            self.settings.data_dir / "logs" / f"{child}.log",
            static=static,
        )

    def add_member(self, base: str) -> Child:
        """One more member of a running group (``processor-decision``, ``tool-jira``), under the next
        free name: the group rebalances to give it partitions."""
        with self._lock:
            index = 1
            while member_name(base, index) in self.children:
                index += 1
            child = self._member(base, index)
            self._add(child)
            child.start()
        self._write_stack_file()
        return child

    def _membership_outlives_s(self, child: Child) -> float:
        """How long the successor of a member that died without leaving its group (kill -9, a crash)
        waits before it starts: until the survivors have taken the dead member's partitions, if it was a
        dynamic member and others of its group are alive; else 0 (a static member, the only one of its
        group, takes its partitions straight back; with nobody left there is nobody to wait for).

        A dead member leaves its group only once its session has expired; until then a rebalance lists
        it (the embedded broker's coordinator drops a member when a join, sync or heartbeat of another
        finds its session over, Tansu's ``missed_heartbeat``), so its partitions cannot move. A successor
        that joins earlier starts a rebalance that leaves them where they are, and the expiry then
        starts a second one: the moved partitions wait for both (the state group's kill -9 pause was
        12.8 s that way in a `bench/scale.py` run, 2026-12-07, with the faust member restarted at once;
        jira's 12.3 s, restarted at once). So the successor starts after the session and one heartbeat
        (a survivor has noticed the expiry by then), and ``_TAKEOVER_S`` more: a confluent successor
        joins within the survivors' rebalance (half a second), a faust state successor after the
        survivors' recovery (6 s), which its join would otherwise start over."""
        head, _, tail = child.name.rpartition("-")
        base = head if tail.isdigit() else child.name
        if child.static:
            return 0.0
        alive = [c for c in self.children.values() if c is not child and group_of(c.name, {base}) == base and c.alive()]
        if not alive:
            return 0.0
        s = self.settings
        if base == "processor-state":
            return (s.state_session_ms + s.state_heartbeat_ms) / 1000 + _TAKEOVER_S[base]
        return (s.session_timeout_ms + s.heartbeat_interval_ms) / 1000 + _TAKEOVER_S[""]

    def members_of(self, base: str) -> list[str]:
        """The member processes of one group now (``processor-decision``: processor-decision, -2, ...)."""
        with self._lock:
            return [n for n in self.children if group_of(n, {base}) == base]

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
        self._write_stack_file()
        return child

    def add_mcp_server(self, server: str, *tools: str) -> Child:
        """Deploy an MCP server's tools (``streamagent tool mcp --server SERVER``, one consumer group per
        tool, one process) into the running stack; their keys derive from the pipeline keys, as `up`'s."""
        argv = cli_argv("tool", "mcp", "--server", server, *(a for t in tools for a in ("--tool", t)))
        name = f"tool-mcp-{server}"
        child = Child(name, argv, self._env_of(name), self.settings.data_dir / "logs" / f"{name}.log")
        with self._lock:
            self._add(child)
            child.start()
        self._write_stack_file()
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
        self._write_stack_file()
        return child

    def undeploy(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one child for good (not restarted): ``SIGTERM`` stops it gracefully, ``SIGKILL`` crashes it."""
        with self._lock:
            child = self.children.pop(name)
        if child.alive() and child.proc is not None and sig != signal.SIGTERM:
            child.proc.send_signal(sig)
        child.stop()
        self._write_stack_file()

    def stop(self) -> list[str]:
        """Stop everything this stack started; returns what was running when asked to stop. Idempotent."""
        with self._lock:
            running = [c.name for c in self.children.values() if c.alive()]
        self._stop.set()
        if self._supervisor is not None:
            # Parked, not ended: it restarts nothing more, and what it restarted keeps running until
            # stopped here, in order (see _released).
            self._parked.wait(65)  # a broker restart in progress finishes first (its own deadline: 60 s)
        stopped: list[str] = list(running)
        with self._lock:
            for child in self.children.values():
                if child.alive() and child.proc is not None:
                    child.proc.send_signal(signal.SIGTERM)
            for child in self.children.values():
                child.stop()
        if self.forker is not None:
            self.forker.close()
        if self.postgres is not None:
            if self.postgres.pid is not None:
                stopped.append("postgres")
            self.postgres.stop()
        if self.broker is not None:
            if self.broker.running:
                stopped.append("broker")
            self.broker.stop()
        self._released.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        with self._file_lock:
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
            ("fork server", self.forker.pid if self.forker is not None else None, signal.SIGKILL),
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
        try:
            while not self._stop.wait(0.2):
                changed = self._check_dependencies()
                with self._lock:
                    for child in self.children.values():
                        changed = self._check(child) or changed
                if changed:  # stack.json names the processes that run now, and how the last ones ended
                    self._write_stack_file()
        finally:
            self._parked.set()
            self._released.wait()

    def _check_dependencies(self) -> bool:
        """Restart a dead embedded broker or PostgreSQL in place: same port, same data dir, so the
        processes (which retry through the outage) reconnect to the same address. The broker comes
        back with its journal; PostgreSQL recovers from its WAL. True if something died or started."""
        changed = False
        if self.broker is not None:
            changed |= self._revive("broker", self.broker, self.broker.restart, self.broker.bootstrap_servers)
        if self.postgres is not None:
            changed |= self._revive("postgres", self.postgres, self.postgres.start, str(self.postgres.data_dir))
        return changed

    def _revive(self, name: str, part: EmbeddedBroker | EmbeddedPostgres, start: Callable[[], object], at: str) -> bool:
        state = self._infra.setdefault(name, _Infra())
        if part.running or self._stop.is_set():
            state.down_since = None
            return False
        now = time.monotonic()
        changed = False
        if state.down_since is None:  # just noticed: say how it ended, and why, once
            state.down_since, changed = now, True
            code = part.last_exit
            stopped = code in (0, -signal.SIGTERM, -signal.SIGINT)
            if stopped or now - state.started_at > 30:
                state.crashes.clear()
            if not stopped:
                state.crashes.append(describe_exit(code))
            state.last_exit, state.last_error = code, last_error_line(part.log_path, part.log_start)
            state.next_try = now + self.infra_restart_delay_s
            ended = describe_exit(code) if code is not None else "died"
            self._tell(
                f"embedded {name} {ended} after {now - state.started_at:.1f}s{self._looping(state.crashes)}:"
                f" {state.last_error or '(its log is empty)'} — restarting it at {at}; log: {part.log_path}"
            )
        if now < state.next_try:
            return changed
        try:
            start()
        except Exception as exc:  # keep supervising; tried again with backoff
            state.failures += 1
            delay = min(self.max_backoff_s, self.restart_backoff_s * 2**state.failures)
            state.next_try = time.monotonic() + delay
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = re.sub(r"[;,:]?\s*log tail:?\s*$", "", reason)
            log.warning("embedded %s did not start again: %s", name, reason, exc_info=True)
            if reason != state.last_failure:  # once per reason, not once per attempt
                state.last_failure = reason
                self._tell(f"embedded {name} could not start again: {reason}; trying again with backoff")
            return changed
        # Counted once it answers (PostgreSQL has recovered, the broker restored its journal): a caller
        # waiting for the restart may use it at once.
        self.infra_restarts[name] = self.infra_restarts.get(name, 0) + 1
        state.failures, state.last_failure, state.down_since = 0, "", None
        state.started_at = time.monotonic()
        self._tell(f"embedded {name} restarted at {at} in {state.started_at - now:.1f}s (pid {part.pid})")
        return True

    def _looping(self, crashes: list[str]) -> str:
        if len(crashes) < CRASH_LOOP_RESTARTS:
            return ""
        return f" (crash loop: {', '.join(crashes[-CRASH_LOOP_RESTARTS:])})"

    def _tell(self, line: str) -> None:
        log.warning(line)
        if self.report is not None:
            self.report(line)

    def _check(self, child: Child) -> bool:
        """Notice a dead child and start it again after its backoff; True if it died or started."""
        if child.proc is None or child.alive():
            return False
        now = time.monotonic()
        changed = child.next_start == 0.0
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
            if not stopped:
                delay = max(delay, self._membership_outlives_s(child))
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
            changed = True
        return changed

    def failing(self) -> str | None:
        """Why the stack cannot make progress (a child, the broker or PostgreSQL that keeps crashing), or None."""
        for name, state in list(self._infra.items()):
            if state.down_since is not None and len(state.crashes) >= CRASH_LOOP_RESTARTS:
                ends = ", ".join(state.crashes[-CRASH_LOOP_RESTARTS:])
                why = state.last_failure or state.last_error or "(its log is empty)"
                return f"embedded {name} keeps crashing (last {ends}): {why}"
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
        """``stack.json``: the addresses (what the CLI and a tool started by hand read), and every process
        that runs now with its start time, so that the next stack in this data dir can tell, after a
        ``kill -9`` of this one, which processes were ours. Rewritten whenever one is restarted."""
        with self._lock:
            processes: dict[str, object] = {
                name: {
                    **(_recorded(child.pid if child.alive() else None) or {"pid": None}),
                    "restarts": child.restarts,
                    "last_exit": describe_exit(child.last_exit) if child.last_exit is not None else None,
                    "last_error": child.last_error or None,
                }
                for name, child in self.children.items()
            }
        for name, part in (("broker", self.broker), ("postgres", self.postgres)):
            if part is not None:
                state = self._infra.get(name, _Infra())
                processes[name] = {
                    **(_recorded(part.pid) or {"pid": None}),
                    "restarts": self.infra_restarts.get(name, 0),
                    "last_exit": describe_exit(state.last_exit) if state.last_exit is not None else None,
                    "last_error": state.last_failure or state.last_error or None,
                }
        bases = {n for n in self.members}
        groups: dict[str, list[str]] = {}
        for name in processes:
            base = group_of(name, bases)
            if base in bases:
                groups.setdefault(base, []).append(name)
        info: dict[str, object] = {
            "members": groups,
            "bootstrap_servers": self.settings.bootstrap_servers,
            "database_url": self.settings.database_url,
            "sandbox_url": self.settings.sandbox_url,
            "ui_url": self.ui_url or None,
            "topic_prefix": self.settings.topic_prefix,
            "pid": os.getpid(),
            "create_time": _create_time(os.getpid()),
            "processes": processes,
        }
        if "broker" in processes:
            info["broker"] = processes["broker"]  # as earlier versions wrote it
        with self._file_lock:
            if self._data_lock is None or self._released.is_set():
                return  # stopped (or stopping): only the running holder of the lock writes the file
            path = self.settings.data_dir / STACK_FILE
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(info, indent=2))
            tmp.replace(path)  # readers never see half a file

    def _reap_leftovers(self, data: Path) -> None:
        """We hold the lock, so a stack file here is stale: its stack died without stopping. Its children
        die with it (a parent-death signal each) but may still be shutting down, holding the ports and
        the journal: wait for every process it names (same pid *and* start time) to end, stopping any
        that does not. Journal brokers on this data dir's journal that no stack file names (left by a
        version of `up` that did not tie them to itself) are stopped too."""
        path = data / STACK_FILE
        info: object = None
        if path.exists():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                info = {}
            message = (
                f"the last stack in {data} (pid {info.get('pid', '?') if isinstance(info, dict) else '?'})"
                " did not stop cleanly; its stack.json is ignored"
            )
            self._tell(message)
        named: dict[str, object] = {}
        if isinstance(info, dict):
            processes = info.get("processes")
            named = dict(processes) if isinstance(processes, dict) else {}
            named.setdefault("broker", info.get("broker"))
        left = {name: proc for name, proc in ((n, _leftover(e)) for n, e in named.items()) if proc is not None}
        for proc in _journal_brokers(data / "broker"):
            if proc.pid not in {p.pid for p in left.values()}:
                left[f"broker (pid {proc.pid}, named by no stack.json)"] = proc
        if left:
            _, alive = psutil.wait_procs(list(left.values()), timeout=10)  # ending on their own, most likely
            for proc in alive:
                # PostgreSQL's fast shutdown is SIGINT (SIGTERM would wait for every client to leave).
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGINT if proc.name() == "postgres" else signal.SIGTERM)
            _, alive = psutil.wait_procs(alive, timeout=10)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
            self._tell(f"waited for what the last stack left running to end: {', '.join(sorted(left))}")
        path.unlink(missing_ok=True)


@dataclass
class _Infra:
    """What the supervisor knows of the embedded broker or PostgreSQL: when it started, how it ended."""

    started_at: float = field(default_factory=time.monotonic)
    down_since: float | None = None
    next_try: float = 0.0
    failures: int = 0  # failed starts in a row
    crashes: list[str] = field(default_factory=list)
    last_exit: int | None = None
    last_error: str = ""
    last_failure: str = ""  # why the last start failed
