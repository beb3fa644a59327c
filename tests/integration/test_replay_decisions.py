"""``streamagent replay decisions`` agrees with itself: on an unchanged setup every recorded decision is
re-decided the same, including steps held for approval (then approved, or denied) and a step that
waited for a tool that was not deployed yet; a changed policy is still reported as a difference.

One stack, three runs: the suite's budget. The replay goes through the real entry point (the CLI's
``main``) against the running stack's broker and PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ended, eventually
from streamagent.processors.projection import queries

from streamagent.authn import issue
from streamagent.catalogue import Catalogue
from streamagent.config import Settings, child_environ, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.events import RunRequested, new_id
from streamagent.signing import load_keys
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

# Mail to anyone outside ok.example waits for a person.
ALLOW_LIST = """
[approvals]
timeout_s = 600

[[approvals.rules]]
tool = "email"
argument = "to"
not_matching = '@ok\\.example$'
reason = "email outside the allow-list"
"""


def request(contact_domain: str, workflow: str = "onboarding") -> RunRequested:
    base = sample_requests(1)[0]
    first = base.contact_name.split()[0].lower()
    return base.model_copy(
        update={"run_id": new_id(), "contact_email": f"{first}@{contact_domain}", "workflow": workflow}
    )


def answer(settings: Settings, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamagent.console.cli", *args],
        env=child_environ(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def waiting(s: Settings, held: list[str], for_crm: str) -> bool:
    rows = {r.run_id: r for r in queries.runs(s) if r.run_id in [*held, for_crm]}
    asked = {r.run_id for r in queries.approvals(s) if r.status == "requested"}
    crm = rows.get(for_crm)
    return set(held) <= asked and crm is not None and crm.reason == "waiting for tool crm"


def tools_up(s: Settings, names: tuple[str, ...]) -> bool:
    with Catalogue(s) as catalogue:
        catalogue.load()
        return all(catalogue.available(name) is not None for name in names)


def replayed(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = cli(["replay", "decisions", *args, "--json"])
    out = capsys.readouterr().out
    with capsys.disabled():  # the report in the test's log, not in the next capture
        print(out)
    return code, json.loads(out.strip().splitlines()[-1]), out


def test_replay_decisions_on_an_unchanged_setup_agrees_with_approvals_and_a_late_tool(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "approvals.toml").write_text(ALLOW_LIST)
    settings = settings.model_copy(update={"policies_dir": policies})
    # crm is not deployed at first: the crm run waits for it.
    with Stack(settings, tools=("enrich", "jira", "draft", "email", "slack")) as stack:
        s = stack.settings
        for key, value in to_env(s).items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        # The runs start once the tools are up: a run decided before its tool announced itself waits and
        # is woken, which a replay re-decides too, but it would make the counts below a matter of timing.
        eventually(lambda: tools_up(s, stack.tools), timeout=60, interval=0.2, what="the four tools announced")
        approve, deny = request("acme-robotics.io"), request("acme-robotics.io")
        late = request("ok.example", workflow="onboarding-with-crm")
        run_ids = produce_requests(s, [approve, deny, late])
        eventually(
            lambda: waiting(s, [approve.run_id, deny.run_id], late.run_id),
            timeout=60,
            interval=0.2,
            what="two runs held for approval and one waiting for crm",
        )

        grace = s.model_copy(update={"operator_keys_file": s.data_dir / "grace.keys"})
        issue(load_keys(s), "operator:grace").write(grace.operator_keys_file)
        answer(grace, "approve", approve.run_id, "email", "--note", "known contact")
        answer(grace, "deny", deny.run_id, "email", "--note", "not our customer")
        stack.add_tool("crm")
        rows = {r.run_id: r for r in eventually(lambda: ended(s, run_ids), timeout=90, interval=0.2, what="ended")}
        assert rows[approve.run_id].status == "completed" and rows[late.run_id].status == "completed"
        assert rows[deny.run_id].status == "failed", rows[deny.run_id].reason

        # A denied run's undo says it was denied, and by whom, in the timeline `show` prints.
        undos = [e for e in queries.timeline(s, deny.run_id) if e.payload.get("action") == "compensate"]
        assert undos and all("denied" in u.payload["reason"] and "grace" in u.payload["reason"] for u in undos)
        capsys.readouterr()
        assert cli(["show", deny.run_id]) == 0
        shown = capsys.readouterr().out
        assert "approval refused by grace" in shown and "undo jira" in shown, shown

        # Unchanged: the same workflows, policy and catalogue as at each decision.
        code, report, out = replayed(capsys)
        counts = report["counts"]
        assert code == 0 and report["differing"] == [], out
        assert counts["not re-decided"] == 0 and counts["same"] == sum(counts.values()) >= 15, out
        with_outcome = [e.payload for r in run_ids for e in queries.timeline(s, r) if e.type == "DecisionRecorded"]
        assert counts["same"] == len(with_outcome), out
        assert {"approval", "allowed"} <= {p.get("guard_outcome") for p in with_outcome}
        assert any(p["reason"] == "waiting for tool crm" for p in with_outcome)

        # One run by id; an id with no recorded decision is an error, not "no difference".
        code, report, out = replayed(capsys, "--runs", late.run_id)
        assert code == 0 and report["counts"]["same"] == sum(report["counts"].values()) >= 6, out
        assert cli(["replay", "decisions", "--runs", f"{late.run_id},no-such-run"]) == 2
        assert "--runs: no decision recorded for run no-such-run" in capsys.readouterr().err

        # Changed: a policy that holds nothing. The two held decisions would now have sent the mail.
        free = tmp_path / "free"
        free.mkdir()
        (free / "none.toml").write_text('description = "no approvals"\n')
        code, report, out = replayed(capsys, "--policies", str(free))
        assert code == 1, out
        assert {(d["run_id"], d["kind"]) for d in report["differing"]} == {
            (approve.run_id, "different outcome"),
            (deny.run_id, "different outcome"),
        }, out
        assert "dispatch email" in out and "waiting for approval of step email" in out
