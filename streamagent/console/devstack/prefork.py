"""A fork server for the dev stack: its processes start from one that has already imported them.

Every process of a stack is ``python -m streamagent.console.cli …``; started from nothing, each spends
0.3 to 1 s of CPU importing pydantic, faust, confluent-kafka, httpx and the project before it does any work,
and a supervised restart pays it again. The fork server imports all of that once, then forks one child
per request; a child only changes its environment and runs the CLI. It is what CPython's
``multiprocessing`` ``forkserver`` start method does, for processes that are not Python functions.

Forking is safe only from a process with one thread and no open connections, sockets or event loops:
the server checks that after its imports and refuses to start otherwise (the stack then starts its
children with ``subprocess`` as before; ``STREAMAGENT_STACK_PREFORK=false`` does that always).

The protocol: JSON lines. The stack writes ``{"id", "argv", "env", "log", "title"}`` on the server's
stdin; the server answers ``{"id", "pid"}`` (or ``{"id", "error"}``) once the child has set its title,
and ``{"exit": pid, "code": n}`` when a child ends (``n`` as ``Popen.returncode``: ``-N`` for signal N).
The server dies with the stack (``PR_SET_PDEATHSIG``) and its children with it, so a ``kill -9`` of
``up`` still leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from streamagent.config import adopt_environ
from streamagent.console.devstack.embedded import die_with_parent

# What the stack's processes import; each is imported once, in the server. A module that starts a thread
# or opens a connection at import time must not be here (the server checks threads and descriptors).
PRELOAD = (
    "setproctitle",
    "streamagent.console.cli",
    "streamagent.processors.state.app",
    "streamagent.processors.decision.processor",
    "streamagent.processors.projection.processor",
    "streamagent.processors.intake.processor",
    "streamagent.processors.memory.processor",
    "streamagent.tools.sdk.runner",
    "streamagent.tools.sandbox.server",
    "streamagent.tools.mcp.runner",
    "streamagent.console.ui.api",
    "streamagent.tools.enrich",
    "streamagent.tools.jira",
    "streamagent.tools.email",
    "streamagent.tools.slack",
    "streamagent.tools.crm",
    "streamagent.tools.draft",
)
# What every command line the server starts begins with (after the interpreter): the CLI, as a module.
CLI_ARGV = ("-m", "streamagent.console.cli")
_READY_S = 120.0
_REPLY_S = 30.0


class ForkError(RuntimeError):
    """The fork server is gone or refused a request: start the process the ordinary way."""


# -- the server --------------------------------------------------------------------------------------------


def _open_descriptors() -> list[int]:
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def _fork_safety_problem(expected_fds: set[int]) -> str | None:
    if threading.active_count() != 1:
        return f"{threading.active_count()} threads after the imports: {[t.name for t in threading.enumerate()]}"
    extra = []
    for fd in _open_descriptors():
        if fd in expected_fds:
            continue
        with contextlib.suppress(OSError):
            extra.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
    # The listing itself opened (and closed) one descriptor; anything still open was left by an import.
    return f"descriptors left open by the imports: {extra}" if extra else None


def _child(request: dict[str, Any], started_w: int) -> None:
    """In the forked child: become the requested process, run it, never return."""
    code = 1
    try:
        from setproctitle import setproctitle

        # First, so whoever reads /proc/PID/cmdline once the stack knows the pid sees the real command line.
        setproctitle(str(request["title"]))
        os.setpgid(0, 0)  # its own group, as the stack's ``process_group=0``: a Ctrl-C reaches only ``up``
        die_with_parent(os.getppid(), signal.SIGKILL)()
        signal.set_wakeup_fd(-1)
        # The dispositions a fresh interpreter starts with: SIGPIPE ignored (a write to a closed socket is a
        # BrokenPipeError, not death), SIGINT a KeyboardInterrupt, SIGTERM and SIGCHLD the default.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's stdin for its life
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.write(started_w, b"1")
        os.close(started_w)
        adopt_environ(request["env"])  # and forget the settings read before the fork
        args = list(request["argv"])[1 + len(CLI_ARGV) :]
        sys.argv = ["streamagent", *args]
        # The module the command line names (imported in the server already), run as `python -m` would.
        code = importlib.import_module(CLI_ARGV[1]).main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # report it where the process's output goes, then exit 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # What an interpreter does on its way out: wait for non-daemon threads, run atexit, flush.
        with contextlib.suppress(BaseException):
            threading._shutdown()  # type: ignore[attr-defined]
        with contextlib.suppress(BaseException):
            import atexit

            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def _serve() -> int:
    out = sys.stdout
    expected = set(_open_descriptors())
    for name in PRELOAD:
        importlib.import_module(name)
    problem = _fork_safety_problem(expected)
    if problem:
        print(json.dumps({"refused": problem}), file=out, flush=True)
        return 1
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears of every exit
    print(json.dumps({"ready": True, "pid": os.getpid()}), file=out, flush=True)
    stdin = sys.stdin.buffer
    buffer = b""
    while True:
        readable, _, _ = select.select([0, wake_r], [], [], 1.0)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        _reap(out)
        if 0 not in readable:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:
            return 0  # the stack closed our stdin: its stop(); the children were stopped before
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                _spawn(json.loads(line), out, (wake_r, wake_w))


def _spawn(request: dict[str, Any], out: IO[str], inherited: tuple[int, int]) -> None:
    started_r, started_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(started_r)
        os.close(started_w)
        print(json.dumps({"id": request["id"], "error": f"fork failed: {exc}"}), file=out, flush=True)
        return
    if pid == 0:
        os.close(started_r)
        for fd in inherited:
            os.close(fd)
        _child(request, started_w)
    os.close(started_w)
    # Reply once the child has set its title and its output (or died trying): the stack then sees the pid
    # of a process that already looks like what it is.
    ready, _, _ = select.select([started_r], [], [], _REPLY_S)
    if ready:
        os.read(started_r, 1)
    os.close(started_r)
    print(json.dumps({"id": request["id"], "pid": pid}), file=out, flush=True)


def _reap(out: IO[str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        print(json.dumps({"exit": pid, "code": _exit_code(status)}), file=out, flush=True)


# -- the client ----------------------------------------------------------------------------------------------


@dataclass
class ForkedProcess:
    """What the stack holds of a forked child: the subset of ``subprocess.Popen`` it uses."""

    pid: int
    server: ForkServer
    returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self.server.returncode(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self.server.wait(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        # Only while the server has not reported it gone: after that the pid may be someone else's.
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class ForkServer:
    """The stack's side: starts the server, asks it for children, hears of their exits."""

    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    _exits: dict[int, int] = field(default_factory=dict)
    _replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    _ready: dict[str, Any] | None = None
    _next_id: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _write_lock: threading.Lock = field(default_factory=threading.Lock)
    _gone: str = ""  # the server exited: its children died with it
    _unusable: str = ""  # it stopped answering: no more requests to it

    def start(self) -> ForkServer:
        """Start the server; it imports in the background while the stack starts its broker."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                process_group=0,
                preexec_fn=die_with_parent(os.getpid(), signal.SIGKILL),  # prctl only
            )
        threading.Thread(target=self._read, name="fork-server-reader", daemon=True).start()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                if "exit" in message:
                    self._exits[int(message["exit"])] = int(message["code"])
                elif "id" in message:
                    self._replies[int(message["id"])] = message
                elif "ready" in message or "refused" in message:
                    self._ready = message
                self._cond.notify_all()
        with self._cond:
            self._gone = self._gone or f"the fork server exited ({self.proc.wait()})"
            self._cond.notify_all()

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Path, title: str) -> ForkedProcess:
        """Start ``argv`` (``python -m streamagent.console.cli …``) as a child of the server."""
        if tuple(argv[1 : 1 + len(CLI_ARGV)]) != CLI_ARGV:
            raise ForkError(f"only the CLI is forked, not {argv[:3]}")
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready is not None or self._gone, _READY_S):
                self._unusable = "the fork server did not get ready"
            why = self._gone or self._unusable or (self._ready or {}).get("refused")
            if why:
                raise ForkError(str(why))
            self._next_id += 1
            request_id = self._next_id
        request = {"id": request_id, "argv": argv, "env": env, "log": str(log_path), "title": title}
        assert self.proc is not None and self.proc.stdin is not None
        try:
            with self._write_lock:
                self.proc.stdin.write(json.dumps(request).encode() + b"\n")
                self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise ForkError(f"the fork server is gone: {exc}") from None
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._replies or self._gone, _REPLY_S):
                # Given up on for good: every later start goes to exec at once, not after another wait. (Not
                # ``_gone``: a slow server's children may live, and must not be reported dead.)
                self._unusable = "the fork server did not answer"
            reply = self._replies.pop(request_id, None)
        if reply is None or "pid" not in reply:
            raise ForkError((reply or {}).get("error") or self._gone or self._unusable or "no reply")
        return ForkedProcess(int(reply["pid"]), self)

    def returncode(self, pid: int) -> int | None:
        with self._cond:
            if pid in self._exits:
                return self._exits[pid]
            # The server is gone: its children died with it (PDEATHSIG), unreported.
            return -signal.SIGKILL if self._gone else None

    def wait(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                code = self._exits.get(pid, -signal.SIGKILL if self._gone else None)
                if code is not None:
                    return code
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server (after the stack stopped its children): EOF on its stdin, then a kill."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


if __name__ == "__main__":
    sys.exit(_serve())
