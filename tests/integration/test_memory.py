"""Shared memory on the real broker and PostgreSQL: entity versions written through intake, read into the
decision that mails the client's contact (and recorded with it), refused writes that were based on an old
version, and a command refused as stale-memory when the contact changed between its decision and its
call, then decided again and sent once, to the new address."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import psycopg
import pytest
from helpers import ended, eventually
from streamagent.tools.sandbox import SandboxClient

from streamagent.config import Settings, get_settings, to_env
from streamagent.console import memory
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import RunRequested
from streamagent.memory import MemoryTable
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration


# Mail to held-memory.example waits for a person; the other tests' mail goes straight through.
HOLD_POLICY = """
[approvals]
timeout_s = 600

[[approvals.rules]]
tool = "email"
argument = "to"
matching = '@held-memory\\.example$'
reason = "mail to held-memory.example needs a person"
"""


@pytest.fixture(scope="module")
def stack(module_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policies = tmp_path_factory.mktemp("policies")
    (policies / "approvals.toml").write_text(HOLD_POLICY)
    # The CRM too: the onboarding-with-crm runs share the company's account id through memory.
    tools = "enrich,jira,draft,email,slack,crm"
    shared = module_settings.model_copy(update={"policies_dir": policies, "stack_tools": tools})
    with Stack(shared) as running:
        yield running


@pytest.fixture
def s(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in to_env(stack.settings).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return stack.settings


def _request(domain: str, contact: str) -> RunRequested:
    (request,) = sample_requests(1, requested_by="memory-test")
    return request.model_copy(update={"company_domain": domain, "contact_email": contact})


def _emails(s: Settings, run_id: str) -> list[str]:
    effects = SandboxClient(s.sandbox_url).effects(api="email", run_id=run_id)
    return [e.request["personalizations"][0]["to"][0]["email"] for e in effects]


def _email_decisions(s: Settings, run_id: str) -> list[dict[str, object]]:
    with psycopg.connect(s.database_url) as conn:
        rows = conn.execute(
            "SELECT payload FROM run_events WHERE run_id=%s AND type='DecisionRecorded' AND step='email'"
            " AND payload->>'action'='dispatch' ORDER BY kafka_offset",
            (run_id,),
        ).fetchall()
    return [r[0] for r in rows]


def test_a_decision_reads_the_contact_from_memory_and_records_its_version(
    s: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli(["memory", "put", "contact", "memory-one.io", "--set", "email=ada@memory-one.io", "--set", "name=Ada"]) == 0
    )
    assert "contact/memory-one.io v1" in capsys.readouterr().out
    known = _request("memory-one.io", "old@memory-one.io")
    unknown = _request("memory-none.io", "request@memory-none.io")
    produce_requests(s, [known, unknown])
    rows = eventually(lambda: ended(s, [known.run_id, unknown.run_id]), timeout=90, what="both runs ended")
    assert {r.status for r in rows} == {"completed"}
    # Memory's contact, not the request's; the request's where memory has none.
    assert _emails(s, known.run_id) == ["ada@memory-one.io"]
    assert _emails(s, unknown.run_id) == ["request@memory-none.io"]
    (decided,) = _email_decisions(s, known.run_id)
    assert decided["memory"] == {"contact/memory-one.io": 1}
    assert decided["context"]["memory"]["contact/memory-one.io"]["fields"]["name"] == "Ada"
    assert _email_decisions(s, unknown.run_id)[0]["memory"] == {"contact/memory-none.io": 0}
    # `show` says what each decision read.
    capsys.readouterr()
    assert cli(["show", known.run_id]) == 0
    assert "[read contact/memory-one.io v1]" in capsys.readouterr().out
    assert cli(["show", unknown.run_id]) == 0
    assert "[read contact/memory-none.io (none)]" in capsys.readouterr().out


def test_writes_are_versioned_checked_and_deletions_remove_the_entity(
    s: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    put = ["memory", "put", "contact", "memory-two.io"]
    assert cli([*put, "--set", "email=a@memory-two.io", "--expect-version", "0"]) == 0
    assert cli([*put, "--set", "email=b@memory-two.io", "--set", "seats:=12", "--expect-version", "1"]) == 0
    capsys.readouterr()
    # A writer that read v1 cannot overwrite v2: refused, with both versions named, and nothing changes.
    assert cli([*put, "--set", "email=c@memory-two.io", "--expect-version", "1"]) == 1
    err = capsys.readouterr().err
    assert "version-conflict" in err and "expected v1, memory has v2" in err
    assert cli(["memory", "get", "contact", "memory-two.io", "--json"]) == 0
    now = json.loads(capsys.readouterr().out)
    assert (now["version"], now["fields"]) == (2, {"email": "b@memory-two.io", "seats": 12})
    assert cli([*put, "--delete"]) == 0
    capsys.readouterr()
    assert cli(["memory", "get", "contact", "memory-two.io"]) == 1
    assert "memory has no contact/memory-two.io (deleted)" in capsys.readouterr().err
    assert cli(["memory", "history", "contact", "memory-two.io", "--json"]) == 0
    history = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(h["version"], h["deleted"]) for h in history] == [(1, False), (2, False), (3, True)]
    assert all(h["writer"].startswith("operator:") for h in history)
    # A bad write is refused before anything is sent, naming the field.
    assert cli(["memory", "put", "Contact", "x.io", "--set", "a=b"]) == 2
    assert "entity:" in capsys.readouterr().err


def test_a_followers_wait_for_the_broker_returns_every_version_acknowledged_before_it(
    s: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    table = MemoryTable(s, "test-caught-up").start()
    try:
        assert cli(["memory", "put", "contact", "memory-fresh.io", "--set", "email=a@memory-fresh.io"]) == 0
        capsys.readouterr()

        async def many() -> list[bool]:
            # A burst of commands checking memory at once, as a tool does: each wait is a future on the
            # loop, so all of them are answered by the follower's next polls.
            return await asyncio.gather(*(table.caught_up(time.monotonic()) for _ in range(200)))

        assert asyncio.run(many()) == [True] * 200
        assert table.version("contact/memory-fresh.io") == 1
    finally:
        table.stop()
    # A stopped follower cannot vouch for anything.
    assert asyncio.run(table.caught_up(time.monotonic())) is False


def test_a_command_decided_on_a_contact_that_changed_before_the_call_is_decided_again(
    stack: Stack, s: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["memory", "put", "contact", "memory-three.io", "--set", "email=first@memory-three.io"]) == 0
    email_tool = stack.children["tool-email"].pid
    assert email_tool is not None
    os.kill(email_tool, signal.SIGSTOP)  # the email tool holds still: the command waits in its topic
    try:
        request = _request("memory-three.io", "request@memory-three.io")
        produce_requests(s, [request])
        eventually(lambda: _email_decisions(s, request.run_id) or None, timeout=60, what="the email dispatched")
        assert cli(["memory", "put", "contact", "memory-three.io", "--set", "email=second@memory-three.io"]) == 0
    finally:
        os.kill(email_tool, signal.SIGCONT)
    (row,) = eventually(lambda: ended(s, [request.run_id]), timeout=90, what="the run ended")
    assert row.status == "completed"
    # Not executed on the old contact: refused as stale-memory, decided again on v2, sent once, to v2.
    assert _emails(s, request.run_id) == ["second@memory-three.io"]
    decisions = _email_decisions(s, request.run_id)
    assert [d["memory"] for d in decisions] == [{"contact/memory-three.io": 1}, {"contact/memory-three.io": 2}]
    with psycopg.connect(s.database_url) as conn:
        (stale,) = conn.execute(
            "SELECT payload FROM run_events WHERE run_id=%s AND type='ToolResult' AND payload->>'error_kind'"
            " = 'stale-memory'",
            (request.run_id,),
        ).fetchone()
    assert stale["output"]["changed"] == ["contact/memory-three.io v1 → v2"]
    capsys.readouterr()
    assert cli(["show", request.run_id]) == 0
    shown = capsys.readouterr().out
    assert "email not called, to be decided again: decided on memory that changed" in shown
    assert "[read contact/memory-three.io v2]" in shown


def _approval_asked(s: Settings, run_id: str, to: str) -> bool:
    with psycopg.connect(s.database_url) as conn:
        rows = conn.execute(
            "SELECT 1 FROM run_events WHERE run_id=%s AND type='ApprovalRequested' AND payload->'arguments'->>'to'=%s",
            (run_id, to),
        ).fetchall()
    return bool(rows)


def _shown(run_id: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert cli(["show", run_id]) == 0
    return capsys.readouterr().out


def test_a_contact_that_changes_while_its_mail_waits_for_approval_is_approved_anew_and_after_the_mail_is_recorded(
    s: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    put = ["memory", "put", "contact", "memory-four.io"]
    assert cli([*put, "--set", "email=first@held-memory.example"]) == 0
    request = _request("memory-four.io", "request@memory-four.io")
    produce_requests(s, [request])
    eventually(lambda: _approval_asked(s, request.run_id, "first@held-memory.example"), timeout=60, what="held, v1")
    # The contact changes while the mail waits: the step is decided again, and the person is asked about
    # the mail that would now be sent, not the one they were first shown.
    assert cli([*put, "--set", "email=second@held-memory.example"]) == 0
    eventually(lambda: _approval_asked(s, request.run_id, "second@held-memory.example"), timeout=60, what="asked anew")
    assert "decided on contact/memory-four.io v1; v2 arrived since" in _shown(request.run_id, capsys)
    assert cli(["approve", request.run_id, "email"]) == 0
    (row,) = eventually(lambda: ended(s, [request.run_id]), timeout=90, what="the run ended")
    assert row.status == "completed"
    assert _emails(s, request.run_id) == ["second@held-memory.example"]
    with psycopg.connect(s.database_url) as conn:
        read = [
            r[0]
            for r in conn.execute(
                "SELECT payload->'memory' FROM run_events WHERE run_id=%s AND type='DecisionRecorded' AND step='email'"
                " ORDER BY kafka_offset",
                (request.run_id,),
            ).fetchall()
        ]
    assert read[0] == {"contact/memory-four.io": 1} and read[-1] == {"contact/memory-four.io": 2}
    # After the mail went out, a change is recorded against the run, not hidden, and the mail is kept.
    assert cli([*put, "--set", "email=third@held-memory.example"]) == 0
    eventually(
        lambda: "v3 arrived since" in _shown(request.run_id, capsys) or None,
        timeout=60,
        what="the late change recorded",
    )
    assert "after the step's effect (kept)" in _shown(request.run_id, capsys)
    assert _emails(s, request.run_id) == ["second@held-memory.example"]

    # Counted in the quality report, with the stale-memory refusal of the earlier test. The draft step reads
    # the contact too (it greets memory's name) and was done before v2 and v3 arrived: two more records
    # after an effect (kept), besides the mail's.
    def report() -> dict[str, int]:
        capsys.readouterr()
        assert cli(["report", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["total"]

    # The two records of v3 (the draft's, the mail's) are projected one after the other.
    total = eventually(lambda: (t := report())["memory_after_effect"] >= 3 and t, timeout=60, what="3 kept")
    assert (total["stale_memory"], total["memory_after_effect"]) == (1, 3)


def _crm_decisions(s: Settings, run_id: str) -> list[dict[str, object]]:
    with psycopg.connect(s.database_url) as conn:
        rows = conn.execute(
            "SELECT payload FROM run_events WHERE run_id=%s AND type='DecisionRecorded' AND step='crm'"
            " AND payload->>'action'='dispatch' ORDER BY kafka_offset",
            (run_id,),
        ).fetchall()
    return [r[0] for r in rows]


def test_runs_for_one_company_share_its_crm_account_and_cannot_overwrite_each_other(
    stack: Stack, s: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = (
        _request("memory-five.io", f"{who}@memory-five.io").model_copy(update={"workflow": "onboarding-with-crm"})
        for who in ("a", "b")
    )
    crm = stack.children["tool-crm"].pid
    assert crm is not None
    os.kill(crm, signal.SIGSTOP)  # both runs decide their CRM step before either is done: both read "none"
    try:
        produce_requests(s, [first, second])
        for run in (first, second):
            eventually(lambda run=run: _crm_decisions(s, run.run_id) or None, timeout=60, what="crm dispatched")
    finally:
        os.kill(crm, signal.SIGCONT)
    rows = eventually(lambda: ended(s, [first.run_id, second.run_id]), timeout=90, what="both runs ended")
    assert {r.status for r in rows} == {"completed"}
    assert all(_crm_decisions(s, r.run_id)[0]["memory"] == {"company/memory-five.io": 0} for r in (first, second))
    # One write won (v1); the other, based on the same "none", was refused by the version check, not
    # applied over it: it waits in the dead letters with both versions named.
    capsys.readouterr()
    assert cli(["memory", "history", "company", "memory-five.io", "--json"]) == 0
    history = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["version"] for h in history] == [1]
    winner = history[0]["writer"]
    assert winner in (f"run:{first.run_id}/crm", f"run:{second.run_id}/crm") and history[0]["fields"]["crm_account_id"]
    refused = [
        letter for letter in read_dead_letters(s, reason="version-conflict") if "company/memory-five.io" in letter.error
    ]
    assert len(refused) == 1 and "expected v0, memory has v1" in refused[0].error
    # A later run for the company reads the account id the first one created, and writes on v1.
    third = _request("memory-five.io", "c@memory-five.io").model_copy(update={"workflow": "onboarding-with-crm"})
    produce_requests(s, [third])
    (row,) = eventually(lambda: ended(s, [third.run_id]), timeout=90, what="the third run ended")
    assert row.status == "completed"
    (decided,) = _crm_decisions(s, third.run_id)
    assert decided["memory"] == {"company/memory-five.io": 1}
    seen = decided["context"]["memory"]["company/memory-five.io"]["fields"]
    assert seen["crm_account_id"] == history[0]["fields"]["crm_account_id"]
    latest = eventually(
        lambda: (found := memory.latest(s, "company", "memory-five.io")) and found["version"] == 2 and found,
        timeout=30,
        what="the third run's write applied on v1",
    )
    assert latest["writer"] == f"run:{third.run_id}/crm"


def test_replay_re_decides_with_the_memory_each_decision_read(s: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """After the tests above (the module's stack): every decision, those that read memory included (a
    contact's v1, v2, and none), re-decides the same: replay reads the versions the decision recorded."""
    capsys.readouterr()
    assert cli(["replay", "decisions", "--decider", "rules", "--json"]) == 0, capsys.readouterr()
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["differing"] == [] and figures["counts"]["memory unknown"] == 0
    assert figures["counts"]["same"] >= 12


def test_replay_rebuilds_the_memory_table_from_the_admitted_writes(
    s: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every entity the tests above wrote (a deletion and a refused conflict among them) rebuilds to the
    version the memory processor published."""
    capsys.readouterr()
    assert cli(["replay"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.strip().startswith("memory ")]
    # contacts memory-one, -two (deleted), -three, -four, -fresh; a company
    assert line.split()[1:3] == ["6", "same"], out
