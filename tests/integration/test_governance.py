"""Governance on the real stack: the guard holds a step for approval, a person answers through the
CLI, budgets and approval timeouts escalate, a policy edit applies without a restart, and a snapshot
that the state processor did not make is never decided on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import ended, eventually, read_topic
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import SandboxClient

from streamagent import codec
from streamagent.authn import issue
from streamagent.config import Settings, child_environ
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.events import (
    OnboardingRequest,
    RunRequested,
    RunStatus,
    StateSnapshot,
    StepState,
    new_id,
    now,
)
from streamagent.kafka import producer as make_producer
from streamagent.signing import load_keys
from streamagent.submit import produce_requests
from streamagent.topics import DEAD_LETTERS, RUN_STATE

pytestmark = pytest.mark.integration

# Mail to anyone outside ok.example waits for a person.
ALLOW_LIST = """
[approvals]
timeout_s = {timeout}

[[approvals.rules]]
tool = "email"
argument = "to"
not_matching = '@ok\\.example$'
reason = "email outside the allow-list"
"""


def request(contact_domain: str) -> RunRequested:
    base = sample_requests(1)[0]
    first = base.contact_name.split()[0].lower()
    return base.model_copy(update={"run_id": new_id(), "contact_email": f"{first}@{contact_domain}"})


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamagent.console.cli", *args],
        env=child_environ(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_row(s: Settings, run_id: str) -> queries.RunRow | None:
    return queries.run(s, run_id)


def held(s: Settings, run_ids: list[str]) -> list[queries.ApprovalRow] | None:
    rows = [r for r in queries.approvals(s) if r.run_id in run_ids]
    return rows if len(rows) == len(run_ids) else None


def effects_of(s: Settings, run_id: str) -> Counter[str]:
    return Counter(f"{e.api}.{e.op}" for e in SandboxClient(s.sandbox_url).effects(run_id=run_id))


def test_a_held_step_waits_for_a_person_approved_runs_once_denied_undoes(settings: Settings, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "approvals.toml").write_text(ALLOW_LIST.format(timeout=600))
    settings = settings.model_copy(update={"policies_dir": policies})
    with Stack(settings) as stack:
        s = stack.settings
        approve, deny, free = request("acme-robotics.io"), request("acme-robotics.io"), request("ok.example")
        produce_requests(s, [approve, deny, free])
        waiting = [approve.run_id, deny.run_id]

        rows = eventually(lambda: held(s, waiting), timeout=60, interval=0.2, what="two approval requests")
        assert {(r.step, r.tool, r.status) for r in rows} == {("email", "email", "requested")}
        assert all(r.arguments["to"].endswith("@acme-robotics.io") and r.policy_version != "none" for r in rows)
        # The free run needed nobody: mail to the allow-list went straight through.
        assert eventually(lambda: ended(s, [free.run_id]), timeout=60, what="the run without approval")[0].status == (
            "completed"
        )
        for run_id in waiting:
            row = run_row(s, run_id)
            assert row is not None and row.status == "running"
            assert row.reason is not None and row.reason.startswith("waiting for approval of step email"), row.reason
            # Held before anything reached the email topic: enrich and jira ran, the mail did not.
            assert effects_of(s, run_id) == {"enrich.find": 1, "jira.create": 1}

        listed = cli(s, "approvals")
        assert listed.returncode == 0, listed.stderr
        assert approve.run_id[:8] in listed.stdout and deny.run_id[:8] in listed.stdout
        # What is being approved, and why: the recipient and the subject, the rule, when it expires.
        line = next(x for x in listed.stdout.splitlines() if x.startswith(approve.run_id[:8]))
        assert f"to={approve.contact_email}" in line and "subject=Welcome" in line and "email outside" in line
        assert " in " in line and "ago" in line  # its age and its expiry
        assert "answer with: streamagent approve" in listed.stdout
        shown = cli(s, "show", approve.run_id[:8])
        assert f"to={approve.contact_email}" in shown.stdout, shown.stdout  # the timeline line names the recipient

        # Grace answers with her own operator key: the approver recorded is the key's identity.
        grace = s.model_copy(update={"operator_keys_file": s.data_dir / "grace.keys"})
        issue(load_keys(s), "operator:grace").write(grace.operator_keys_file)
        granted = cli(grace, "approve", approve.run_id, "email", "--note", "known contact")
        assert granted.returncode == 0, granted.stderr
        assert "as grace" in granted.stdout
        refused = cli(grace, "deny", deny.run_id, "email", "--by", "grace", "--note", "not our customer")
        assert refused.returncode == 0, refused.stderr
        # A name that is not the key's is refused, not recorded.
        impostor = cli(grace, "approve", approve.run_id, "email", "--by", "mallory")
        assert impostor.returncode == 1 and "'grace'" in impostor.stderr and "Traceback" not in impostor.stderr
        # A second answer, or an answer for a step that is not held, is one line and changes nothing.
        again = cli(s, "approve", approve.run_id, "email")
        assert again.returncode == 1 and "already" in again.stderr and "Traceback" not in again.stderr
        nothing = cli(grace, "approve", approve.run_id, "slack")
        assert nothing.returncode == 1 and "no approval pending for step slack" in nothing.stderr

        rows = eventually(lambda: ended(s, waiting), timeout=60, interval=0.2, what="both answered runs ended")
        status = {r.run_id: r for r in rows}
        assert status[approve.run_id].status == "completed", status[approve.run_id].reason
        assert effects_of(s, approve.run_id) == {
            "enrich.find": 1,
            "jira.create": 1,
            "email.send": 1,
            "slack.post_message": 1,
        }
        assert status[deny.run_id].status == "failed", status[deny.run_id].reason
        assert "denied" in (status[deny.run_id].reason or "") or status[deny.run_id].failed_step == "email"
        # Denied: no mail, and the Jira project the run made was undone, saying why and by whom.
        assert effects_of(s, deny.run_id) == {"enrich.find": 1, "jira.create": 1, "jira.delete": 1}
        undos = [e.payload for e in queries.timeline(s, deny.run_id) if e.payload.get("action") == "compensate"]
        assert undos and all("refused by grace" in u["reason"] for u in undos), undos

        answered = {r.run_id: r for r in queries.approvals(s, pending=False) if r.run_id in waiting}
        assert answered[approve.run_id].status == "granted" and answered[approve.run_id].decided_by == "grace"
        assert answered[deny.run_id].status == "denied" and answered[deny.run_id].note == "not our customer"
        timeline = queries.timeline(s, approve.run_id)
        kinds = [e.type for e in timeline]
        assert "ApprovalRequested" in kinds and "ApprovalGranted" in kinds
        guarded = [e.payload for e in timeline if e.type == "DecisionRecorded" and e.payload.get("guard_outcome")]
        assert {"approval", "allowed"} <= {p["guard_outcome"] for p in guarded}
        # The approved command carried its token to the tool.
        sent = [e.payload for e in timeline if e.type == "ToolCommand" and e.payload["tool"] == "email"]
        assert len(sent) == 1 and sent[0]["approval"].startswith("a1:")

        # The log is the truth for governance too: a replay rebuilds the approvals, verdicts and the
        # runs' state identical to the live ones.
        replayed = cli(s, "replay", "--json")
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        figures = json.loads(replayed.stdout.strip().splitlines()[-1])
        assert figures["differ"] == 0 and figures["runs"] >= 3, replayed.stdout


def test_a_policy_edit_applies_to_the_next_decision_budgets_and_approval_timeouts_escalate(
    settings: Settings, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = policies / "approvals.toml"
    policy.write_text(ALLOW_LIST.format(timeout=600))
    settings = settings.model_copy(update={"policies_dir": policies, "policy_reload_s": 0.2})
    with Stack(settings) as stack:
        s = stack.settings
        before = request("ok.example")
        produce_requests(s, [before])
        assert eventually(lambda: ended(s, [before.run_id]), timeout=60, what="a run")[0].status == "completed"

        # While the stack runs: a tool-call budget for onboarding runs, and approvals that expire in 1 s.
        policy.write_text(ALLOW_LIST.format(timeout=1) + "\n[workflows.onboarding.budgets]\nmax_tool_calls = 4\n")
        over, unanswered = request("ok.example"), request("acme-robotics.io")
        produce_requests(s, [over, unanswered])
        rows = {r.run_id: r for r in eventually(lambda: ended(s, [over.run_id, unanswered.run_id]), timeout=60)}

        assert rows[over.run_id].status == "escalated"
        assert "max_tool_calls=4" in (rows[over.run_id].reason or ""), rows[over.run_id].reason
        # Four calls made (enrich, jira, draft, email), the fifth refused before it reached a tool topic.
        assert effects_of(s, over.run_id)["slack.post_message"] == 0

        assert rows[unanswered.run_id].status == "escalated"
        assert "not given within 1 s" in (rows[unanswered.run_id].reason or ""), rows[unanswered.run_id].reason
        assert effects_of(s, unanswered.run_id)["email.send"] == 0
        expired = [r for r in queries.approvals(s, pending=False) if r.run_id == unanswered.run_id]
        assert [r.status for r in expired] == ["expired"]

        # Every guard verdict names the policy version in force when it was made: two versions here.
        versions = {
            e.payload["policy_version"]
            for run_id in (before.run_id, over.run_id)
            for e in queries.timeline(s, run_id)
            if e.type == "DecisionRecorded" and e.payload.get("guard_outcome")
        }
        assert len(versions) == 2, versions


def test_a_snapshot_the_state_processor_did_not_sign_is_dead_lettered_and_decided_on_never(
    settings: Settings,
) -> None:
    with Stack(settings, tools=("enrich",)) as stack:
        s = stack.settings
        ghost = "ghost-" + new_id()
        forged = StateSnapshot(
            run_id=ghost,
            version=1,
            status=RunStatus.running,
            request=OnboardingRequest(
                company_name="Ghost",
                company_domain="ghost.io",
                contact_name="G",
                contact_email="g@ghost.io",
                goal="g",
                requested_by="t",
            ),
            steps=[StepState(name=n) for n in ("enrich", "jira", "email", "slack")],
            created_at=now(),
            updated_at=now(),
            deadline_at=now(),
            last_event_id=new_id(),
        )
        producer = make_producer(s)
        producer.produce(s.topic(RUN_STATE), key=ghost.encode(), value=codec.encode(forged))
        assert producer.flush(10) == 0

        def dead_letter() -> list[dict[str, str]] | None:
            letters = [
                {k: (v or b"").decode() for k, v in (m.headers() or [])}
                for m in read_topic(s, s.topic(DEAD_LETTERS))
                if m.key() == ghost.encode()
            ]
            return letters or None

        letters = eventually(dead_letter, timeout=60, interval=0.3, what="the forged snapshot dead-lettered")
        assert [h.get("dlq.reason") for h in letters] == ["unauthenticated"], letters
        # A real run goes through on the same topic meanwhile, and the ghost never reached a tool.
        real = request("ok.example")
        produce_requests(s, [real])
        eventually(lambda: SandboxClient(s.sandbox_url).effects(run_id=real.run_id) or None, timeout=60)
        assert SandboxClient(s.sandbox_url).effects(run_id=ghost) == []
