"""The operator CLI against a real broker and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import ended, eventually

from streamagent.config import Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.events import now
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    for key, value in to_env(settings).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def test_topics_create_is_idempotent(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["topics", "create"]) == 0
    first = capsys.readouterr().out
    assert "created 15 topic(s)" in first and env.topic("agent.run.state") in first
    assert env.topic("agent.run.requests") in first  # the intake topic, the one upstream systems write
    assert cli(["topics", "create"]) == 0
    assert "created 0 topic(s): none, all existed" in capsys.readouterr().out


def test_submit_wait_runs_show_and_dlq(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with Stack(env) as stack:
        s = stack.settings
        # The stack's own sandbox URL is what the CLI must see too.
        monkeypatch.setenv("STREAMAGENT_SANDBOX_URL", s.sandbox_url)
        get_settings.cache_clear()
        requests = sample_requests(2)
        lines = [json.dumps(r.model_dump(mode="json", include=set(_fields()))) for r in requests]
        path = tmp_path / "requests.jsonl"
        path.write_text("\n".join([*lines, '{"company_name": "Half a request"}']) + "\n")
        capsys.readouterr()
        assert cli(["submit", "--file", str(path), "--skip-invalid", "--wait", "--timeout", "90"]) == 0
        out, err = capsys.readouterr()
        assert "skipped line 3: company_domain: Field required" in err  # the good lines went through
        run_ids = [r.run_id for r in requests]
        assert all(run_id in out for run_id in run_ids)

        assert cli(["runs", "--status", "completed", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert {r["run_id"] for r in listed} == set(run_ids)

        assert cli(["show", run_ids[0], "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["run"]["status"] == "completed"
        steps = [e["step"] for e in shown["timeline"] if e["type"] == "ToolResult"]
        assert steps == ["enrich", "jira", "draft", "email", "slack"]

        assert cli(["sandbox", "effects", "--json"]) == 0
        effects = json.loads(capsys.readouterr().out)
        assert len(effects) == 8

        # Without --url or STREAMAGENT_SANDBOX_URL, the sandbox of the stack running in the data dir.
        monkeypatch.setenv("STREAMAGENT_SANDBOX_URL", "")
        get_settings.cache_clear()
        assert cli(["sandbox", "effects", "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 8

        assert cli(["show", "no-such-run"]) == 1
        assert cli(["dlq", "list", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []

        # -- run lists like `git log`, and run ids by any unique prefix ----------------------------------
        base = sample_requests(3)
        stamped = [
            r.model_copy(update={"run_id": f"feed{c}0-{i}", "occurred_at": now() + timedelta(seconds=i + 1)})
            for i, (r, c) in enumerate(zip(base, "abb", strict=True))
        ]
        produce_requests(s, stamped)
        eventually(lambda: ended(s, [r.run_id for r in stamped]), timeout=90, what="three more runs ended")
        capsys.readouterr()
        assert cli(["runs", "--limit", "2", "--json"]) == 0
        newest = [r["run_id"] for r in json.loads(capsys.readouterr().out)]
        assert newest == ["feedb0-2", "feedb0-1"]  # the newest two, newest first
        assert cli(["runs", "--before", "feedb0-1", "--limit", "1", "--json"]) == 0
        assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ["feeda0-0"]  # the next page
        assert cli(["show", "feeda0", "--json"]) == 0  # a unique prefix
        assert json.loads(capsys.readouterr().out)["run"]["run_id"] == "feeda0-0"
        assert cli(["show", "feedb0"]) == 1  # two runs start so: both are named
        err = capsys.readouterr().err
        assert "feedb0-1" in err and "feedb0-2" in err and "several" in err and "Traceback" not in err
        assert cli(["show", "feeda"]) == 1  # too short to be taken as a prefix
        assert "at least 6 characters" in capsys.readouterr().err


def _fields() -> list[str]:
    return ["run_id", "company_name", "company_domain", "contact_name", "contact_email", "goal", "requested_by"]


def test_the_cli_finds_the_stack_from_a_subdirectory_like_git(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "src" / "deep").mkdir(parents=True)
    with Stack(settings.model_copy(update={"data_dir": project / ".streamagent"}), tools=(), processors=()) as stack:
        for key, value in to_env(stack.settings).items():
            monkeypatch.setenv(key, value)
        # Nothing named: no data dir, no addresses. The CLI must find the stack by walking up.
        for key in ("DATA_DIR", "BOOTSTRAP_SERVERS", "DATABASE_URL", "SANDBOX_URL"):
            monkeypatch.delenv(f"STREAMAGENT_{key}")
        monkeypatch.chdir(project / "src" / "deep")
        get_settings.cache_clear()
        assert cli(["runs", "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out) == []
        monkeypatch.chdir(tmp_path)  # outside the project: no stack above
        get_settings.cache_clear()
        assert cli(["runs"]) == 1
        assert "no running stack" in capsys.readouterr().err
    get_settings.cache_clear()
