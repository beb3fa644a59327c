"""What a tool checks before its external call (tools/sdk/admission.py, ratelimit.py).

Pure parts without a broker: the token bucket on a fake clock, the rate re-read from the policy in
force, which commands need approval, what makes a command stale. Then the runner on the real broker
and PostgreSQL: a tool class that requires approval runs only approved commands, a compensation runs
unapproved and after its run ended, a command already done republishes its result whatever else,
and the policy's rate limit spaces the calls.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from helpers import TEST_APPROVAL_KEYS, eventually, read_topic, record_decision
from pydantic import BaseModel
from streamagent.processors.decision.schema import SCHEMA as DECISION_SCHEMA
from streamagent.tools.sdk import CallContext, Tool
from streamagent.tools.sdk.admission import DecisionsTableMissing, Freshness, approval_needed, unapproved
from streamagent.tools.sdk.ratelimit import RateLimiter, TokenBucket
from streamagent.tools.sdk.runner import ToolRunner
from streamagent.tools.sdk.schema import SCHEMA as LEDGER_SCHEMA

from streamagent import approval, codec, db
from streamagent.authn import tool_keys
from streamagent.config import Settings
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import ToolCommand, ToolResult, ToolStatus, now
from streamagent.kafka import create_topics
from streamagent.policy import PolicyStore, load_policy
from streamagent.signing import load_keys, parse_keys, sign
from streamagent.topics import TOOL_RESULTS, command_topic

APPROVAL_KEYS = parse_keys(TEST_APPROVAL_KEYS, "test approval keys")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# -- the rate limit ----------------------------------------------------------------------------------------
def test_the_bucket_paces_calls_and_refills_after_an_idle_spell() -> None:
    clock = Clock()
    bucket = TokenBucket(clock)
    assert [bucket.reserve(10.0) for _ in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])  # queued in order
    clock.t += 0.3  # the last reservation's turn: the debt is paid, nothing saved up
    assert bucket.reserve(10.0) == pytest.approx(0.1)
    clock.t += 5.0  # idle: one token, not fifty (no burst after a quiet spell)
    assert [bucket.reserve(10.0) for _ in range(2)] == pytest.approx([0.0, 0.1])
    bucket.give_back()  # the last reservation was not used
    assert bucket.reserve(10.0) == pytest.approx(0.1)
    assert [bucket.reserve(None) for _ in range(3)] == [0.0, 0.0, 0.0]  # no limit


def test_the_limiter_reads_the_rate_of_the_policy_in_force(tmp_path: Path) -> None:
    policy = tmp_path / "limits.toml"
    policy.write_text("[rate_limits]\nenrich = 10.0\n")
    clock = Clock()
    limiter = RateLimiter("enrich", PolicyStore(tmp_path, reload_s=0), clock)
    other = RateLimiter("jira", PolicyStore(tmp_path, reload_s=0), clock)
    assert [limiter.reserve() for _ in range(2)] == pytest.approx([0.0, 0.1])
    assert [other.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]  # a tool without a limit
    policy.write_text("[rate_limits]\nenrich = 2.0  # slower\n")  # an edit, no restart
    assert limiter.reserve() == pytest.approx(1.0)  # two calls owed at 2/s
    policy.unlink()
    assert limiter.reserve() == 0.0
    assert (limiter.waits, limiter.waited_s) == (2, pytest.approx(1.1))


# -- approval and staleness --------------------------------------------------------------------------------
def _cmd(
    args: dict[str, Any] | None = None, operation: str = "execute", token: str = "", run: str = "r"
) -> ToolCommand:
    return ToolCommand(
        run_id=run,
        command_id=f"{run}-c",
        decision_id="d1",
        tool="email",
        step="email",
        operation=operation,
        arguments=args or {"to": "x@elsewhere.io"},
        deadline_at=now() + timedelta(seconds=60),
        approval=token,
    )


def test_which_commands_need_approval(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        '[[approvals.rules]]\ntool = "email"\nargument = "to"\nnot_matching = "@example\\\\.com$"\n'
        'workflows = ["vip"]\nreason = "mail outside"\n'
        '[[approvals.rules]]\ntool = "jira"\nenvironments = ["production"]\nreason = "prod jira"\n'
    )
    policy = load_policy(tmp_path)
    # A rule restricted to a workflow applies at the tool, which does not know the run's workflow.
    assert approval_needed(_cmd(), False, policy, "dev") == "mail outside"
    assert approval_needed(_cmd({"to": "a@example.com"}), False, policy, "dev") is None
    assert approval_needed(_cmd(operation="compensate"), True, policy, "dev") is None  # an undo always runs
    assert approval_needed(_cmd({"to": "a@example.com"}), True, policy, "dev") == (
        "tool email requires approval for every call"
    )
    jira = _cmd().model_copy(update={"tool": "jira"})
    assert approval_needed(jira, False, policy, "dev") is None
    assert approval_needed(jira, False, policy, "production") == "prod jira"

    expires = datetime.now(UTC) + timedelta(minutes=5)
    args = {"to": "x@elsewhere.io"}
    good = approval.mint("r", "email", "email", args, expires, APPROVAL_KEYS)
    assert unapproved(_cmd(args, token=good), False, policy, "dev", APPROVAL_KEYS) is None
    refusals = {
        "none": unapproved(_cmd(args), False, policy, "dev", APPROVAL_KEYS),
        "other args": unapproved(_cmd({"to": "y@elsewhere.io"}, token=good), False, policy, "dev", APPROVAL_KEYS),
        "other run": unapproved(_cmd(args, token=good, run="r2"), False, policy, "dev", APPROVAL_KEYS),
        "expired": unapproved(
            _cmd(args, token=good), False, policy, "dev", APPROVAL_KEYS, at=expires + timedelta(seconds=1)
        ),
    }
    assert {k: r.reason for k, r in refusals.items() if r} == dict.fromkeys(refusals, "unapproved")
    details = {k: r.detail for k, r in refusals.items() if r}
    assert details["none"].startswith("no approval token")
    assert details["other args"].startswith("approval token does not match")
    assert details["other run"].startswith("approval token does not match")
    assert details["expired"].startswith("approval token expired")
    assert all(f"approval needed: mail outside (policy {policy.version})" in d for d in details.values())


def test_what_makes_a_command_stale() -> None:
    command = _cmd()
    going = Freshness(False, True, "d2", "dispatch", 4)
    assert going.stale(command) is None  # its decision is an earlier one of a run still going
    assert Freshness(False, True, "d9", "wait", 7).stale(command) is None
    unknown = Freshness(False, False, "d2", "dispatch", 4).stale(command)
    assert unknown == "decision d1 is not a recorded decision of run r (its latest is d2, dispatch at version 4)"
    never = Freshness(False, False).stale(command)
    assert never is not None and never.startswith("run r has no recorded decision")
    for action in ("complete", "fail", "escalate"):
        ended = Freshness(False, True, "d9", action, 7, "d9", action, 7).stale(command)
        assert ended == f"run r has ended: decision d9 at version 7 was {action} (its latest is {action} at version 7)"
    # An escalated run undoes its steps after the decision that ended it: still ended.
    undoing = Freshness(False, True, "d10", "compensate", 8, "d9", "escalate", 7).stale(command)
    assert undoing == "run r has ended: decision d9 at version 7 was escalate (its latest is compensate at version 8)"


def test_a_tool_refuses_to_start_on_a_database_without_the_decisions_table(settings: Settings) -> None:
    """Without the decision processor's table the tool cannot tell a stale command: it does not start
    (one line from the CLI: a SettingsError), before it touches the broker."""
    runner = ToolRunner(settings, Guarded())
    with pytest.raises(DecisionsTableMissing, match="start the decision processor against it first"):
        asyncio.run(runner.run())
    with db.connect(settings) as conn:  # its own table was created; nothing of the decision layer's
        assert conn.execute("SELECT to_regclass('tool_ledger') IS NOT NULL, to_regclass('decisions')").fetchone() == (
            True,
            None,
        )


# -- the runner, on the real broker ------------------------------------------------------------------------
class Numbers(BaseModel):
    n: int


class Guarded(Tool[Numbers, Numbers]):
    """An ``enrich`` that needs a person's approval for every call (the class says so)."""

    name = "enrich"
    description = "test double"
    input_model = Numbers
    output_model = Numbers
    requires_approval = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    async def call(self, args: Numbers, ctx: CallContext) -> Numbers:
        self.calls.append((ctx.command_id, "execute", time.monotonic()))
        return Numbers(n=args.n)

    async def compensate(self, args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self.calls.append((ctx.command_id, "compensate", time.monotonic()))
        return {}


def _command(run: str, operation: str = "execute", n: int = 1) -> ToolCommand:
    return ToolCommand(
        run_id=run,
        command_id=f"{run}-{operation}",
        decision_id=f"{run}-d",
        tool="enrich",
        step="enrich",
        operation=operation,
        arguments={"n": n},
        deadline_at=now() + timedelta(seconds=60),
    )


def _approved(command: ToolCommand) -> ToolCommand:
    expires = datetime.now(UTC) + timedelta(minutes=5)
    token = approval.mint(command.run_id, command.step, command.tool, command.arguments, expires, APPROVAL_KEYS)
    return command.model_copy(update={"approval": token})


@pytest.mark.integration
def test_the_runner_calls_only_approved_current_commands_at_the_policys_rate(
    settings: Settings, tmp_path: Path
) -> None:
    rate = 10.0
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "rate.toml").write_text(f"[rate_limits]\nenrich = {rate}\n")
    settings = settings.model_copy(update={"policies_dir": policies})
    db.migrate(settings, LEDGER_SCHEMA, DECISION_SCHEMA)
    create_topics(settings)
    keys = tool_keys(load_keys(settings), "enrich")  # the enrich tool's own key (streamagent.authn)
    approved = [_approved(_command(f"run-{i}", n=i)) for i in range(6)]
    for command in approved:
        record_decision(settings, command.run_id, 0, command.decision_id, step="enrich")
    unapproved_ = _command("run-bare")  # a current decision, but no token: the class requires approval
    record_decision(settings, unapproved_.run_id, 0, unapproved_.decision_id, step="enrich")
    # A failed run undoes its step after it ended, with no token: an undo always runs.
    undo = _command("run-failed", "compensate")
    record_decision(settings, "run-failed", 0, "run-failed-d", step="enrich")
    record_decision(settings, "run-failed", 3, "run-failed-undo", "compensate", step="enrich")
    record_decision(settings, "run-failed", 4, "run-failed-end", "fail")
    # Done before its run ended (no token then either): redelivered, its recorded result is republished.
    done = _command("run-done")
    recorded = codec.encode(
        ToolResult(
            run_id="run-done", command_id=done.command_id, tool="enrich", step="enrich", status=ToolStatus.succeeded
        )
    )
    record_decision(settings, "run-done", 0, done.decision_id, step="enrich")
    record_decision(settings, "run-done", 1, "run-done-end", "complete")
    with db.connect(settings) as conn:
        conn.execute(
            "INSERT INTO tool_ledger (command_id, tool, run_id, step, status, attempts, result_event)"
            " VALUES (%s, 'enrich', 'run-done', 'enrich', 'succeeded', 1, %s)",
            (done.command_id, recorded),
        )
    topic = settings.topic(command_topic("enrich"))
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for command in [*approved, unapproved_, undo, done]:
        producer.produce(topic, key=command.run_id.encode(), value=codec.encode(sign(command, keys)))
    assert producer.flush(10) == 0

    tool = Guarded()
    runner = ToolRunner(settings, tool)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(runner.run(),), daemon=True)
    thread.start()
    try:
        results_topic = settings.topic(TOOL_RESULTS)
        published = eventually(
            lambda: (lambda got: got if len(got) >= 8 else None)(
                [codec.decode(m.value()) for m in read_topic(settings, results_topic)]
            ),
            timeout=60,
            what="a result for every admitted command",
        )
        letters = eventually(lambda: read_dead_letters(settings), timeout=30, what="the unapproved command's letter")
    finally:
        loop.call_soon_threadsafe(runner.stop)
        thread.join(30)
    assert not thread.is_alive()

    assert sorted(r.command_id for r in published) == sorted(c.command_id for c in [*approved, undo, done])
    assert recorded in [codec.encode(r) for r in published]  # republished, not run again
    assert [(d.reason, codec.decode(d.value or b"").command_id) for d in letters] == [
        ("unapproved", unapproved_.command_id)
    ]
    assert letters[0].error.startswith("no approval token")
    assert "approval needed: tool enrich requires approval for every call" in letters[0].error
    calls = Counter((cid, op) for cid, op, _at in tool.calls)
    assert calls == {**{(c.command_id, "execute"): 1 for c in approved}, (undo.command_id, "compensate"): 1}
    # Every call waited its turn: n calls at `rate`/s span at least (n - 1) / rate (turns are granted
    # exactly 1/rate apart; each call then starts after a small, variable delay of the event loop, so
    # single gaps vary and the span gets a margin). Unlimited, they span microseconds.
    starts = sorted(at for _cid, _op, at in tool.calls)
    assert starts[-1] - starts[0] >= 0.8 * (len(starts) - 1) / rate, [b - a for a, b in itertools.pairwise(starts)]
    assert runner.limiter.waits >= 1
