"""``streamagent up`` as a user runs it: a real process, one stack per data dir, clean restarts, Ctrl-C.

Every ``up`` here is a subprocess of the real entry point; readiness is its own "Ctrl-C stops
everything" line, polled under a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from streamagent.config import Settings, to_env
from streamagent.console.demo import NoProgress, wait_for_runs
from streamagent.console.devstack.embedded import free_port, pid_alive
from streamagent.console.devstack.stack import CRASH_LOOP_RESTARTS, Stack, StackLock, StackStartError

pytestmark = pytest.mark.integration

READY = "Ctrl-C stops everything"
REQUEST = [
    "--company-name",
    "Pied Piper",
    "--company-domain",
    "piedpiper.com",
    "--contact-name",
    "Richard Hendricks",
    "--contact-email",
    "richard@piedpiper.com",
    "--requested-by",
    "crm",
]


def eventually(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)  # poll interval under a deadline


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAGENT_")}
    # No run timeline page unless a test asks for one, and free ports for the broker and the sandbox:
    # their fixed defaults may be taken on this machine, or by another test's stack.
    free = {"STREAMAGENT_UI_PORT": "0", "STREAMAGENT_BROKER_PORT": "0", "STREAMAGENT_SANDBOX_PORT": "0"}
    return {**env, **free, **extra}


def cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamagent.console.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Up:
    """One ``streamagent up`` subprocess, its output in files."""

    def __init__(self, env: dict[str, str], out_dir: Path) -> None:
        self.env = env
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_path = out_dir / f"up-{time.monotonic_ns()}.out"
        self.err_path = self.out_path.with_suffix(".err")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> Up:
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamagent.console.cli", "up"], env=self.env, stdout=out, stderr=err
            )
        eventually(lambda: READY in self.out or self.proc.poll() is not None, timeout, "up to be ready")
        assert self.proc.poll() is None, f"up exited {self.proc.returncode}: {self.out}{self.err}"
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def children(self) -> dict[str, int]:
        """Child name -> pid, from the command lines of up's children (forked by its fork server, so one
        level down; a forked process's title is its command line)."""
        found = {}
        for child in psutil.Process(self.pid).children(recursive=True):
            argv = " ".join(child.cmdline()).split()
            if "streamagent.console.cli" in argv:
                rest = argv[argv.index("streamagent.console.cli") + 1 :]
                found[rest[0] if rest[0] in ("sandbox", "ui") else f"{rest[0]}-{rest[1]}"] = child.pid
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def assert_gone(pids: list[int], timeout: float, what: str) -> None:
    eventually(lambda: not any(pid_alive(p) for p in pids), timeout, what)


# -- the embedded stack, as a user starts it ------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    base = tmp_path_factory.mktemp("up")
    env = clean_env(STREAMAGENT_DATA_DIR=str(base / "data"), STREAMAGENT_UI_PORT=str(free_port()))
    up = Up(env, base).start()
    yield up
    up.stop()


def data_dir(up: Up) -> Path:
    return Path(up.env["STREAMAGENT_DATA_DIR"]).resolve()


def test_a_second_up_on_a_running_data_dir_is_refused(embedded_up: Up) -> None:
    stack_file = data_dir(embedded_up) / "stack.json"
    before = stack_file.read_text()

    second = cli(["up"], embedded_up.env, timeout=30)

    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"already running in {data_dir(embedded_up)} (pid {embedded_up.pid})" in lines[0]
    # the first one is untouched and still serves
    assert stack_file.read_text() == before
    assert embedded_up.proc is not None and embedded_up.proc.poll() is None
    runs = cli(["runs", "--json"], embedded_up.env)
    assert runs.returncode == 0, runs.stderr


def test_up_serves_the_run_timeline_page_and_prints_its_url(embedded_up: Up) -> None:
    url = f"http://127.0.0.1:{embedded_up.env['STREAMAGENT_UI_PORT']}"
    assert f"run timeline page: {url}" in embedded_up.out
    assert "ui" in embedded_up.children()
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 200 and "<title>streamagent · runs</title>" in page.text
    assert set(httpx.get(url + "/api/runs", timeout=10).json()) == {"runs", "counts", "at", "next_before"}


def test_demo_while_up_runs_leaves_up_working(embedded_up: Up) -> None:
    data = data_dir(embedded_up)
    before = (data / "stack.json").read_text()
    children = embedded_up.children()

    demo = cli(["demo", "--runs", "1", "--timeout", "120"], embedded_up.env, timeout=300)

    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert f"runs its own in {data / 'demo'}" in demo.stdout
    assert (data / "stack.json").read_text() == before
    assert embedded_up.children() == children  # no child of up was stopped or restarted
    submitted = cli(["submit", *REQUEST, "--wait", "--timeout", "120"], embedded_up.env, timeout=180)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = submitted.stdout.splitlines()[0]
    runs = cli(["runs", "--status", "completed", "--json"], embedded_up.env)
    assert run_id in {r["run_id"] for r in json.loads(runs.stdout)}


# -- crash, restart, Ctrl-C (on the session's broker and PostgreSQL, to keep it light) --------------------
def test_up_survives_kill_9_restarts_cleanly_reports_crashes_and_stops_on_ctrl_c(
    settings: Settings, tmp_path: Path
) -> None:
    env = clean_env(**{**to_env(settings), "STREAMAGENT_UI_PORT": "0"})
    first = Up(env, tmp_path).start()
    try:
        orphans = list(first.children().values())
        assert len(orphans) == 11  # the sandbox, intake, memory, state, decision, projection, five tools, the page
    except BaseException:
        first.stop()  # a failed check must not leave a whole stack running behind the suite
        raise

    first.proc.kill()  # type: ignore[union-attr]  # kill -9: no cleanup at all
    first.proc.wait()  # type: ignore[union-attr]
    # its children die with it instead of competing with the next up's
    assert_gone(orphans, 15, "the children of a killed up to exit")
    assert (settings.data_dir / "stack.json").exists()  # left behind, stale

    second = Up(env, tmp_path).start()  # the stale lock and stack file do not stop it
    try:
        assert json.loads((settings.data_dir / "stack.json").read_text())["pid"] == second.pid
        assert cli(["runs"], env).returncode == 0

        # a child that dies is reported on up's terminal with how it died and its last log line
        os.kill(second.children()["tool-slack"], signal.SIGKILL)
        eventually(lambda: "tool-slack killed by SIGKILL" in second.err, 15, "up to report the crash")
        line = next(x for x in second.err.splitlines() if "tool-slack killed by SIGKILL" in x)
        assert "restarting in" in line and "tool-slack.log" in line
        eventually(lambda: "tool-slack" in second.children(), 15, "tool-slack to be restarted")

        children = list(second.children().values())
        began = time.monotonic()
        second.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert second.proc.wait(30) == 0  # type: ignore[union-attr]
        took = time.monotonic() - began
        assert_gone(children, 5, "up's children to be gone after Ctrl-C")
        assert took < 20, f"Ctrl-C took {took:.1f}s"
        assert "stopped 11 process(es) in" in second.out
        assert not (settings.data_dir / "stack.json").exists()
        assert "Traceback" not in second.out + second.err
    finally:
        second.stop()


def test_a_crash_looping_child_is_reported_and_ends_a_wait(settings: Settings) -> None:
    reports: list[str] = []
    with Stack(settings, tools=(), processors=(), restart_backoff_s=0.05, report=reports.append) as stack:
        stack.add_tool("nosuch")  # a tool this build does not have: it exits at once, every time
        eventually(stack.failing, 30, "the crash loop to be noticed")
        message = stack.failing()
        assert message is not None and "tool-nosuch keeps crashing" in message
        assert "last exit code 2, exit code 2, exit code 2" in message  # how each crash ended
        assert "invalid choice: 'nosuch'" in message  # its last error line, from its log file
        assert any("tool-nosuch exit code 2" in r and "invalid choice: 'nosuch'" in r for r in reports), reports
        assert any("(crash loop: exit code 2, exit code 2, exit code 2)" in r for r in reports), reports

        began = time.monotonic()
        with pytest.raises(NoProgress, match="tool-nosuch keeps crashing"):
            wait_for_runs(stack.settings, ["never-submitted"], timeout_s=120, stuck=stack.failing)
        assert time.monotonic() - began < 5


def test_a_child_stopped_with_sigterm_is_restarted_and_never_called_a_crash_loop(settings: Settings) -> None:
    """A rolling restart stops a child with SIGTERM, again and again: each is reported as a stop."""
    reports: list[str] = []
    with Stack(settings, tools=(), processors=(), restart_backoff_s=0.05, report=reports.append) as stack:
        for n in range(CRASH_LOOP_RESTARTS + 1):
            pid = stack.kill("sandbox", signal.SIGTERM)
            eventually(
                lambda pid=pid: stack.children["sandbox"].alive() and stack.children["sandbox"].proc.pid != pid,
                30,
                f"the sandbox started again ({n + 1})",
            )
        stops = [r for r in reports if r.startswith("sandbox ")]
        assert len(stops) == CRASH_LOOP_RESTARTS + 1, reports
        assert all("stopped (" in r and "crash" not in r for r in stops), stops
        assert stack.failing() is None


def test_a_stack_that_cannot_start_says_why_and_leaves_the_data_dir_free(settings: Settings) -> None:
    stack = Stack(settings, tools=(), processors=(), sandbox_faults={"fax": {"error_rate": 0.5}})
    began = time.monotonic()
    with pytest.raises(StackStartError, match=r"sandbox exit code 2 during start: .*unknown api 'fax'"):
        stack.start()
    assert time.monotonic() - began < 15  # not the 20 s health-check deadline
    assert not (settings.data_dir / "stack.json").exists()
    StackLock(settings.data_dir.resolve()).acquire().release()  # the lock was released
