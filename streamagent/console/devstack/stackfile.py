"""One stack per data dir: the lock, the stack file, and finding a running stack's addresses.

Kept apart from ``stack`` (and free of heavy imports) because every CLI command reads it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from streamagent.config import Settings

STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"


class StackRunning(RuntimeError):
    """Another process holds the data dir's lock: its stack is running."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.data_dir = data_dir
        self.pid = pid
        who = f"pid {pid}" if pid else "pid unknown"
        hint = f"`kill {pid}`" if pid else "stop it"
        super().__init__(
            f"a stack is already running in {data_dir} ({who}); stop it first (Ctrl-C in its terminal, or {hint}),"
            " or give this one another data dir with STREAMAGENT_DATA_DIR"
        )


class StackLock:
    """One stack per data dir: an exclusive ``flock`` on ``<data_dir>/stack.lock``, held for the life of
    the stack. The kernel drops it when the holder dies, however it dies, so a lock file left behind by
    ``kill -9`` is never mistaken for a running stack (and no pid, which the OS may reuse, is trusted).
    The file holds the holder's pid, for messages only. It is never deleted: deleting a lock file lets
    two processes lock two different files of the same name."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.5) -> StackLock:
        """Take the lock or raise StackRunning. ``wait_s`` covers another CLI command's brief probe."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pid = _read_pid(fd)
                    os.close(fd)
                    raise StackRunning(self.data_dir, pid) from None
                time.sleep(0.02)  # a probe holds the lock for microseconds
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def running_pid(data_dir: Path) -> int | None:
    """The pid of the process whose stack runs in ``data_dir`` (0 if it holds the lock but its pid is not
    written yet), or None if no stack runs there. Asks the kernel, not the pid."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_stack_file(data_dir: Path) -> dict[str, object] | None:
    """What a running ``up`` wrote about itself; None if nothing runs there (a file left by a dead stack
    is stale and ignored)."""
    path = data_dir / STACK_FILE
    if not path.exists() or running_pid(data_dir) is None:
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


ADDRESSES = ("bootstrap_servers", "database_url", "sandbox_url")


# The data dir a command uses when STREAMAGENT_DATA_DIR is not set (relative: the project directory's).
DEFAULT_DATA_DIR = Path(".streamagent")


def discover(settings: Settings) -> Settings:
    """Fill unset addresses from a running ``streamagent up`` in the same data dir, if there is one.

    A stack file is trusted only while its writer holds the data dir's lock: after a crash the file
    may remain, and its pid may by now belong to anything."""
    if all(getattr(settings, k) for k in ADDRESSES):
        return settings
    info = read_stack_file(settings.data_dir)
    updates: dict[str, object] = {}
    if info is None and settings.data_dir == DEFAULT_DATA_DIR:
        # Like git: from a subdirectory of the project, the stack of the nearest directory above that
        # runs one (its data dir then serves for keys and logs too). STREAMAGENT_DATA_DIR names one outright.
        for parent in Path.cwd().resolve().parents:
            info = read_stack_file(parent / DEFAULT_DATA_DIR)
            if info is not None:
                updates["data_dir"] = parent / DEFAULT_DATA_DIR
                break
    if info is None:
        return settings
    updates.update({k: str(info[k]) for k in ADDRESSES if not getattr(settings, k) and info.get(k)})
    return settings.model_copy(update=updates)
