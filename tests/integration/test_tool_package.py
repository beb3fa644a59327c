"""A team's own tool, from its own package, outside this repository (issue 23, item 1).

`streamagent new tool NAME --dir DIR` writes the package into a temporary folder; it is pip-installed
into this venv (offline: --no-deps --no-build-isolation) and uninstalled at the end. Its own test passes
as written. Then, into a running stack: runs of the package's example workflow, read from the package's
folder through STREAMAGENT_WORKFLOWS_DIR (beside the repository's workflows), wait for the tool; the tool
is started with `streamagent tool NAME` as a new consumer group (nothing else restarts), appears in the
live catalogue, calls its own API (STREAMAGENT_TOOL_URLS: a fake API this test runs and that counts
calls), and every run completes with exactly one effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ended, eventually
from streamagent.processors.projection import queries
from streamagent.tools.sdk import ApiCall, FakeApi

from streamagent.catalogue import Catalogue
from streamagent.config import DEFAULT_WORKFLOWS_DIR, Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Unique per session: the venv is shared with whatever else runs meanwhile. After every shipped tool's name
# in sorted order, so a test listing the known tools meanwhile still sees them first.
NAME = f"team-desk-{uuid.uuid4().hex[:6]}"
MODULE = NAME.replace("-", "_") + "_tool"
RUNS = 4


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The generated package, installed into this venv for the module's tests, then uninstalled."""
    folder = tmp_path_factory.mktemp("team") / f"{NAME}-tool"
    assert REPOSITORY not in folder.parents  # outside the repository, as a team's own package is
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAGENT_")}
    made = subprocess.run(
        [str(BIN / "streamagent"), "new", "tool", NAME, "--dir", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder.parent,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    started = time.monotonic()
    installed = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(folder))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    print(f"\npip install of the generated package: {time.monotonic() - started:.1f}s")
    try:
        yield folder
    finally:
        removed = _pip("uninstall", "-y", f"{NAME}-tool")
        assert removed.returncode == 0, removed.stdout + removed.stderr


def test_the_generated_package_passes_its_own_test(package: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMAGENT_", "PYTEST_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package)],
        cwd=package,  # pytest DIR, run where the team would: this repository's conftest plays no part
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout, done.stdout
    # It tested the installed package, not the folder's source by accident.
    where = subprocess.run(
        [sys.executable, "-c", f"import {MODULE}; print({MODULE}.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0 and "site-packages" in where.stdout, where.stdout + where.stderr


def waiting_for(s: Settings, run_ids: list[str]) -> list[queries.RunRow] | None:
    rows = [r for r in queries.runs(s) if r.run_id in run_ids]
    ok = len(rows) == len(run_ids) and all(
        r.status == "running" and r.reason == f"waiting for tool {NAME}" for r in rows
    )
    return rows if ok else None


def _answer(call: ApiCall) -> tuple[int, dict[str, str]]:
    return 201, {"id": f"item-{call.idempotency_key}"}


def test_runs_waiting_for_the_packaged_tool_complete_once_it_is_deployed(package: Path, settings: Settings) -> None:
    workflows = f"{DEFAULT_WORKFLOWS_DIR}{os.pathsep}{package / 'workflows'}"
    requests = [r.model_copy(update={"workflow": f"{NAME}-example"}) for r in sample_requests(RUNS)]
    with FakeApi(_answer) as api:
        settings = settings.model_copy(update={"workflows_dir": workflows, "tool_urls": json.dumps({NAME: api.url})})
        with Stack(settings, tools=()) as stack:  # none of the shipped tools: the workflow needs only its own
            s = stack.settings
            run_ids = produce_requests(s, requests)
            eventually(lambda: waiting_for(s, run_ids), timeout=60, interval=0.2, what=f"the runs waiting for {NAME}")
            assert api.calls == []
            started = {name: child.pid for name, child in stack.children.items()}

            stack.add_tool(NAME)  # `streamagent tool NAME`: its own consumer group, into the running stack

            def announced() -> object:
                with Catalogue(s) as catalogue:
                    entries = {e.name: e for e in catalogue.load().entries()}
                entry = entries.get(NAME)
                return entry if entry is not None and entry.status == "available" else None

            entry = eventually(announced, timeout=60, interval=0.5, what=f"{NAME} available in the catalogue")
            assert entry.input_schema["required"] == ["subject"]  # type: ignore[attr-defined]

            rows = eventually(lambda: ended(s, run_ids), timeout=60, interval=0.2, what="the runs ended")
            assert Counter(r.status for r in rows) == {"completed": RUNS}, [(r.run_id, r.reason) for r in rows]
            # Nothing was restarted: every process that ran before the tool is the process it was.
            assert {n: c.pid for n, c in stack.children.items() if n in started} == started
            assert {n: c.restarts for n, c in stack.children.items() if c.restarts} == {}

    # One effect per run, on the team's API (not the sandbox), with the workflow's arguments.
    effects = api.effects
    assert Counter(e.run_id for e in effects) == dict.fromkeys(run_ids, 1), [c.run_id for c in api.calls]
    assert sorted(e.json["subject"] for e in effects) == sorted(f"New client {r.company_name}" for r in requests)
    assert {(e.method, e.path) for e in effects} == {("POST", f"/v1/{NAME}")}
