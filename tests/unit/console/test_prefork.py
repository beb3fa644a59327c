"""The dev stack's fork server: a forked process is the CLI command it was asked to be, in its own
environment, named by its command line, and its end is reported as ``subprocess`` reports it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
from helpers import eventually

from streamagent.config import child_environ
from streamagent.console.devstack.prefork import ForkError, ForkServer
from streamagent.console.devstack.stack import cli_argv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ForkServer:
    base = tmp_path_factory.mktemp("prefork")
    forker = ForkServer(base / "fork-server.log", child_environ()).start()
    yield forker
    forker.close()


def test_a_forked_command_runs_in_the_environment_it_was_given(server: ForkServer, tmp_path: Path) -> None:
    log = tmp_path / "check.log"
    argv = cli_argv("workflows", "check")
    ok = server.spawn(argv, child_environ(), log, title=" ".join(argv))
    assert ok.wait(60) == 0, log.read_text()
    assert "ok  onboarding:" in log.read_text()
    # The settings are read from the environment of the request, not from the server's.
    bad_log = tmp_path / "bad.log"
    bad = server.spawn(argv, child_environ(STREAMAGENT_NOT_A_SETTING="1"), bad_log, title=" ".join(argv))
    assert bad.wait(60) == 2
    assert "STREAMAGENT_NOT_A_SETTING is not a setting" in bad_log.read_text()


def test_a_forked_process_shows_its_command_line_and_dies_of_the_signal_it_gets(
    server: ForkServer, tmp_path: Path
) -> None:
    argv = cli_argv("sandbox", "--host", "127.0.0.1", "--port", "0")
    proc = server.spawn(argv, child_environ(), tmp_path / "sandbox.log", title=" ".join(argv))
    # A child of the server, in a process group of its own, named as `ps` would name a fresh interpreter.
    child = psutil.Process(proc.pid)
    assert child.ppid() == server.pid
    assert os.getpgid(proc.pid) == proc.pid
    assert " ".join(child.cmdline()).split() == argv
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    eventually(lambda: not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() != "zombie", 10)


def test_only_the_cli_is_forked(server: ForkServer, tmp_path: Path) -> None:
    with pytest.raises(ForkError, match="only the CLI"):
        server.spawn([sys.executable, "-c", "pass"], child_environ(), tmp_path / "x.log", title="x")
