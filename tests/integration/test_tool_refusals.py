"""The tool enforces governance itself: commands produced straight onto its topic by a producer that holds
the command signing key (so every one passes the signature) reach the real jira tool of an embedded
stack, whose policy holds every Jira call for a person's approval. Only the approved, current command
touches the sandbox; the others are dead-lettered ``unapproved`` (no token, a token for other
arguments or another run, an expired one) or ``stale`` (its run ended, or its decision was never
recorded), with no effect.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer
from helpers import TEST_APPROVAL_KEYS, eventually, read_topic, record_decision
from streamagent.tools.sandbox import SandboxClient

from streamagent import approval, codec
from streamagent.authn import tool_keys
from streamagent.config import Settings
from streamagent.console.devstack.stack import Stack
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import ToolCommand, ToolStatus, now
from streamagent.signing import load_keys, parse_keys, sign
from streamagent.topics import TOOL_RESULTS, command_topic

pytestmark = pytest.mark.integration

APPROVAL_KEYS = parse_keys(TEST_APPROVAL_KEYS, "test approval keys")


def _jira(run_id: str, key: str, decision_id: str | None = None) -> ToolCommand:
    return ToolCommand(
        run_id=run_id,
        command_id=f"{run_id}-jira",
        decision_id=decision_id or f"{run_id}-d",
        tool="jira",
        step="jira",
        arguments={"key": key, "name": f"Project {key}", "lead_email": "lead@example.io"},
        deadline_at=now() + timedelta(seconds=60),
    )


def _token(command: ToolCommand, *, run_id: str | None = None, arguments: dict[str, str] | None = None,
           expires_in_s: float = 300) -> str:  # fmt: skip
    expires = datetime.now(UTC) + timedelta(seconds=expires_in_s)
    return approval.mint(
        run_id or command.run_id, command.step, command.tool, arguments or command.arguments, expires, APPROVAL_KEYS
    )


def _with(command: ToolCommand, token: str) -> ToolCommand:
    return command.model_copy(update={"approval": token})


def test_a_signed_command_without_a_valid_approval_or_for_an_ended_run_has_no_effect(
    settings: Settings, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "hold-jira.toml").write_text('[[approvals.rules]]\ntool = "jira"\nreason = "every Jira call"\n')
    settings = settings.model_copy(update={"policies_dir": policies})

    ok = _jira("run-ok", "GOOD1")
    ok = _with(ok, _token(ok))
    forged = _jira("run-forged", "FORGE1")  # (a) no token at all
    other_args = _jira("run-args", "EVIL1")  # (b) approved for other arguments
    other_args = _with(other_args, _token(other_args, arguments={**other_args.arguments, "key": "MILD1"}))
    replayed = _jira("run-replay", "GOOD1")  # (b) run-ok's approval, replayed for another run
    replayed = _with(replayed, ok.approval)
    expired = _jira("run-expired", "LATE1")  # (c)
    expired = _with(expired, _token(expired, expires_in_s=-1))
    ended = _jira("run-ended", "AFTER1")  # (d) validly approved, but its run escalated
    ended = _with(ended, _token(ended))
    unknown = _jira("run-unknown", "NEVER1", decision_id="made-up")  # (e) a decision its run never recorded
    unknown = _with(unknown, _token(unknown))
    refused = {
        "run-forged": "unapproved",
        "run-args": "unapproved",
        "run-replay": "unapproved",
        "run-expired": "unapproved",
        "run-ended": "stale",
        "run-unknown": "stale",
    }

    with Stack(settings, tools=("jira",), processors=()) as stack:
        s = stack.settings
        for command in (ok, forged, other_args, replayed, expired, ended):
            record_decision(s, command.run_id, 0, command.decision_id, step="jira")
        # It escalated, then recorded the undo of its steps: its latest decision is not the one that ended it.
        record_decision(s, "run-ended", 4, "run-ended-escalated", "escalate")
        record_decision(s, "run-ended", 5, "run-ended-undo", "compensate", step="enrich")
        record_decision(s, "run-unknown", 0, "run-unknown-d", step="jira")
        keys = load_keys(s)  # the producer holds the command key: every command passes the signature
        producer = Producer({"bootstrap.servers": s.bootstrap_servers})
        for command in (forged, other_args, replayed, expired, ended, unknown, ok):
            value = codec.encode(sign(command, tool_keys(keys, command.tool)))
            producer.produce(s.topic(command_topic("jira")), key=command.run_id.encode(), value=value)
        assert producer.flush(10) == 0

        def letters() -> dict[str, tuple[str, str]] | None:
            got = {
                codec.decode(d.value or b"").run_id: (d.reason, d.error or "")
                for d in read_dead_letters(s)
                if d.processor == "tool.jira"
            }
            return got if len(got) >= len(refused) else None

        dead = eventually(letters, timeout=60, what="every refused command dead-lettered")
        results = eventually(
            lambda: [codec.decode(m.value()) for m in read_topic(s, s.topic(TOOL_RESULTS))],
            timeout=60,
            what="the approved command's result",
        )
        sandbox = SandboxClient(s.sandbox_url)
        effects = sandbox.effects()
        requests = sandbox.stats()["jira"]["requests"]
        assert {n: c.restarts for n, c in stack.children.items() if c.restarts} == {}  # nothing crashed

    assert {run: reason for run, (reason, _) in dead.items()} == refused
    assert dead["run-forged"][1].startswith("no approval token")
    assert dead["run-args"][1].startswith("approval token does not match")
    assert dead["run-replay"][1].startswith("approval token does not match")
    assert dead["run-expired"][1].startswith("approval token expired")
    assert all("approval needed: every Jira call" in dead[r][1] for r, why in refused.items() if why == "unapproved")
    assert dead["run-ended"][1] == (
        "run run-ended has ended: decision run-ended-escalated at version 4 was escalate"
        " (its latest is compensate at version 5)"
    )
    assert dead["run-unknown"][1].startswith("decision made-up is not a recorded decision of run run-unknown")
    assert [(r.run_id, r.status) for r in results] == [("run-ok", ToolStatus.succeeded)]
    # The sandbox records every call it gets: exactly one, the approved command's.
    assert [(e.api, e.run_id) for e in effects] == [("jira", "run-ok")]
    assert requests == 1
