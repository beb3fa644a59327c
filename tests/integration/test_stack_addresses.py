"""Issue 19: one `up` keeps its addresses, and its processes are its own.

Every `up` here is the real entry point as a subprocess, on its own broker and PostgreSQL (the point is
what happens to them), at fixed ports picked free for the module: a tool started by hand as the README
says (`streamagent tool crm`) must find the next `up` where it left the last one. The tests of the
module share one `up` and run in order (pytest -n keeps a file on one worker); the last one kills it.
Nothing sleeps to synchronise: every wait polls a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from test_up import REQUEST, Up, clean_env, cli, eventually

from streamagent.console.devstack.embedded import _resolve_broker_bin, free_port, pid_alive

pytestmark = pytest.mark.integration

CRM_RUN = [*REQUEST, "--workflow", "onboarding-with-crm", "--wait", "--timeout", "120"]


@dataclass
class Running:
    """The module's `up`, its environment, and the crm tool started beside it by hand."""

    env: dict[str, str]
    base: Path
    up: Up
    tool: subprocess.Popen[bytes] | None = None
    tool_log: Path | None = None

    @property
    def data(self) -> Path:
        return Path(self.env["STREAMAGENT_DATA_DIR"]).resolve()

    def stack_file(self) -> dict[str, object]:
        return json.loads((self.data / "stack.json").read_text())

    def pid_of(self, name: str) -> int | None:
        processes = self.stack_file()["processes"]
        assert isinstance(processes, dict)
        return processes[name]["pid"]


def _tool_lines(path: Path) -> int:
    return len(path.read_bytes().splitlines())


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("addresses")
    # Fixed for the module, as a user's defaults are fixed: every `up` below listens on these.
    env = clean_env(
        STREAMAGENT_DATA_DIR=str(base / "data"),
        STREAMAGENT_BROKER_PORT=str(free_port()),
        STREAMAGENT_SANDBOX_PORT=str(free_port()),
    )
    state = Running(env, base, Up(env, base).start())
    # As the README says: into the running stack, from the project dir, no address given (stack.json).
    state.tool_log = base / "tool-crm.log"
    with state.tool_log.open("wb") as log:
        state.tool = subprocess.Popen(
            [sys.executable, "-m", "streamagent.console.cli", "tool", "crm"], env=env, stdout=log, stderr=log
        )
    yield state
    if state.tool.poll() is None:
        state.tool.terminate()
        try:
            state.tool.wait(15)
        except subprocess.TimeoutExpired:
            state.tool.kill()
    state.up.stop()


def test_a_port_in_use_is_refused_in_one_line_naming_its_setting(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = clean_env(
            STREAMAGENT_DATA_DIR=str(tmp_path / "data"),
            STREAMAGENT_BROKER_PORT=str(port),
            STREAMAGENT_SANDBOX_PORT=str(free_port()),
        )
        refused = cli(["up"], env, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"port {port} for the broker is in use; set STREAMAGENT_BROKER_PORT to another port" in lines[0]
    assert not (tmp_path / "data" / "broker").exists()  # nothing was started


def test_a_second_broker_on_the_same_journal_is_refused(running: Running) -> None:
    holder = running.pid_of("broker")
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamagent.console.devstack.broker",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--data-dir",
            str(running.data / "broker"),
            "--tansu",
            _resolve_broker_bin(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 6, second.stdout + second.stderr
    assert f"journal in use: {running.data / 'broker' / 'journal.log'} is held by another broker (pid {holder})" in (
        second.stderr
    )
    assert "tansu" not in second.stdout + second.stderr  # refused before it started a Tansu of its own
    assert pid_alive(holder)  # the running one is untouched


def test_a_killed_broker_is_reported_and_stack_json_names_the_new_one(running: Running) -> None:
    old = running.pid_of("broker")
    assert old is not None
    os.kill(old, signal.SIGKILL)

    def restarted() -> int | None:
        pid = running.pid_of("broker")
        return pid if pid not in (None, old) and pid_alive(pid) else None

    eventually(restarted, 60, "stack.json to name a restarted, live broker")
    new = running.pid_of("broker")
    info = running.stack_file()["processes"]["broker"]  # type: ignore[index]
    assert info["create_time"] == psutil.Process(new).create_time() and info["restarts"] == 1
    assert psutil.Process(new).ppid() == running.up.pid
    eventually(lambda: "embedded broker restarted at" in running.up.err, 10, "up to report the restart")
    died = next(line for line in running.up.err.splitlines() if "embedded broker killed by SIGKILL" in line)
    assert "restarting it at 127.0.0.1:" in died and "broker.log" in died, died


def test_a_crash_loop_is_reported_with_exit_codes_and_the_last_error_line(running: Running) -> None:
    key = running.data / "keys" / "tool-slack.keys"
    good = key.read_bytes()
    key.write_text("not a key\n")  # as a hand edit gone wrong: the restarted tool cannot start
    try:
        os.kill(running.up.children()["tool-slack"], signal.SIGKILL)
        eventually(lambda: "tool-slack exit code" in running.up.err and "(crash loop:" in running.up.err, 60, "loop")
    finally:
        key.write_bytes(good)
    loop = next(line for line in running.up.err.splitlines() if "(crash loop:" in line)
    # How each of the three ended (the kill that started it, then the failed starts), then why it fails.
    assert re.search(r"\(crash loop: killed by SIGKILL, exit code ([12]), exit code \1\)", loop), loop
    assert "tool-slack.keys" in loop and "tool-slack.log" in loop, loop  # its last error line, and where to look
    entry = running.stack_file()["processes"]["tool-slack"]  # type: ignore[index]
    assert entry["restarts"] >= 2 and "tool-slack.keys" in entry["last_error"], entry
    eventually(lambda: "tool-slack" in running.up.children(), 60, "tool-slack to run again with its key back")


def test_kill_9_of_up_leaves_nothing_and_a_tool_started_by_hand_rejoins_the_next_up(running: Running) -> None:
    assert running.tool is not None and running.tool_log is not None
    first = cli(["submit", *CRM_RUN], running.env, timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr  # the hand-started tool works

    up = psutil.Process(running.up.pid)
    everything = up.children(recursive=True)  # the broker, its Tansu, PostgreSQL and its backends, ...
    names = {p.name() for p in everything}
    assert "postgres" in names and any("tansu" in n for n in names), names
    lines_before = _tool_lines(running.tool_log)
    down_at = time.monotonic()
    running.up.proc.kill()  # type: ignore[union-attr]  # kill -9: no cleanup at all
    running.up.proc.wait()  # type: ignore[union-attr]
    eventually(lambda: not [p for p in everything if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 30, "all")

    again = Up(running.env, running.base).start()
    running.up = again
    down_s = time.monotonic() - down_at
    spoken = _tool_lines(running.tool_log) - lines_before
    assert "did not stop cleanly" in again.err
    assert running.tool.poll() is None, "the hand-started tool exited"
    # While the stack was down the tool said so, not hundreds of times (librdkafka alone retries every ~50 ms).
    assert spoken < 80, f"{spoken} log lines in {down_s:.1f}s down"

    second = cli(["submit", *CRM_RUN], running.env, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr + running.tool_log.read_text()[-3000:]
    run_id = second.stdout.splitlines()[0]
    shown = json.loads(cli(["show", run_id, "--json"], running.env).stdout)
    assert shown["run"]["status"] == "completed"
    assert "crm" in [e["step"] for e in shown["timeline"] if e["type"] == "ToolResult"]
