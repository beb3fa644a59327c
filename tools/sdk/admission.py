"""What a tool checks between a command's signature and its external call: is it stale, is it approved.

The order, for every command (docs/governance/tool-checks.md):

1. signature (runner ``_decode``): ``unauthenticated``;
2. dedupe: a command id whose ledger row is final republishes its recorded result, whatever follows;
3. ``stale``: an ``execute`` command whose decision is not a recorded decision of its run, or whose
   run has ended: one of its recorded decisions is complete, fail or escalate (not only the latest: a
   run records its undos, ``compensate``, after the decision that ended it);
4. ``unapproved``: an ``execute`` command that needs a person's approval (the tool class says
   ``requires_approval``, or a rule of the policy in force matches it) and carries no valid token;
5. the call.

A compensation (``operation = compensate``) is exempt from 3 and 4: an undo always runs, after the
run ended too (that is when a failed run undoes).

Staleness is read from the decision processor's ``decisions`` table, in the same database as the
ledger: one statement per consumed batch (``ADMIT_SQL``), which also says which commands' ledger
rows are final (so that dedupe comes first). Only the run's own rows are read, through the table's
primary key (run_id, based_on_version): no index is added for this. The table is the decision
layer's; this module names it and the columns it reads (``run_id``, ``based_on_version``,
``decision_id``, ``action``) and nothing else, and the runner refuses to start where it does not exist
(``require_decisions_table``).

The tool does not know a run's workflow (a command does not carry it), so a policy rule restricted
to some ``workflows`` is taken to apply to every command of its tool: conservative, a command may
be held that the guard let through without a token, never the opposite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from streamagent import approval
from streamagent.config import Settings, SettingsError
from streamagent.errors import Rejected
from streamagent.events import DecisionAction, ToolCommand
from streamagent.policy import Policy
from streamagent.signing import CommandKeys

# How a run ends: one of its recorded decisions is one of these. Not only its latest: an escalated or
# failed run records its undos (``compensate``) after the decision that ended it.
TERMINAL = [DecisionAction.complete.value, DecisionAction.fail.value, DecisionAction.escalate.value]

# One row per input command, in order: whether its ledger row is final, whether its decision is one of
# its run's recorded decisions, its run's latest recorded decision, and the first one that ended the run
# (each read through the table's primary key, run_id first).
ADMIT_SQL = """
SELECT
    EXISTS (
        SELECT 1 FROM tool_ledger t
        WHERE t.command_id = i.command_id AND t.status IN ('succeeded', 'failed')
    ) AS done,
    EXISTS (
        SELECT 1 FROM decisions d WHERE d.run_id = i.run_id AND d.decision_id = i.decision_id
    ) AS known,
    latest.decision_id, latest.action, latest.based_on_version,
    ended.decision_id, ended.action, ended.based_on_version
FROM unnest(%(ids)s::text[], %(runs)s::text[], %(decisions)s::text[])
    WITH ORDINALITY AS i(command_id, run_id, decision_id, n)
LEFT JOIN LATERAL (
    SELECT d.decision_id, d.action, d.based_on_version FROM decisions d
    WHERE d.run_id = i.run_id ORDER BY d.based_on_version DESC LIMIT 1
) AS latest ON true
LEFT JOIN LATERAL (
    SELECT d.decision_id, d.action, d.based_on_version FROM decisions d
    WHERE d.run_id = i.run_id AND d.action = ANY(%(terminal)s::text[]) ORDER BY d.based_on_version LIMIT 1
) AS ended ON true
ORDER BY i.n
"""


class DecisionsTableMissing(SettingsError):
    """The database has no ``decisions`` table: the tool cannot tell a stale command from a current one."""


def require_decisions_table(settings: Settings) -> None:
    """Refuse to start against a database the decision processor never used: every command would
    otherwise be refused (or, worse, a stale one run)."""
    from streamagent import db

    with db.connect(settings) as conn:
        row = conn.execute("SELECT to_regclass('decisions') IS NOT NULL").fetchone()
    if not (row and row[0]):
        raise DecisionsTableMissing(
            "the tool refuses stale commands by reading the decision processor's `decisions` table, and"
            " this database has none: start the decision processor against it first (it creates its"
            " tables), or run the tool beside `streamagent up`"
        )


@dataclass(frozen=True)
class Freshness:
    """One command's row of ``ADMIT_SQL``."""

    done: bool
    known: bool
    latest_decision: str | None = None
    latest_action: str | None = None
    latest_version: int | None = None
    ended_decision: str | None = None
    ended_action: str | None = None
    ended_version: int | None = None

    def stale(self, command: ToolCommand) -> str | None:
        """Why ``command`` is stale, in words (the dead letter's detail), or None."""
        if self.latest_action is None:
            return (
                f"run {command.run_id} has no recorded decision: decision {command.decision_id} was not made"
                " by the decision processor"
            )
        if not self.known:
            return (
                f"decision {command.decision_id} is not a recorded decision of run {command.run_id}"
                f" (its latest is {self.latest_decision}, {self.latest_action} at version {self.latest_version})"
            )
        if self.ended_action is not None:
            return (
                f"run {command.run_id} has ended: decision {self.ended_decision} at version {self.ended_version}"
                f" was {self.ended_action} (its latest is {self.latest_action} at version {self.latest_version})"
            )
        return None


def freshness_params(commands: Sequence[ToolCommand]) -> dict[str, Any]:
    return {
        "ids": [c.command_id for c in commands],
        "runs": [c.run_id for c in commands],
        "decisions": [c.decision_id for c in commands],
        "terminal": TERMINAL,
    }


def freshness_rows(rows: Sequence[tuple[Any, ...]]) -> list[Freshness]:
    return [Freshness(bool(done), bool(known), *rest) for done, known, *rest in rows]


def approval_needed(command: ToolCommand, requires_approval: bool, policy: Policy, environment: str) -> str | None:
    """Why ``command`` needs a person's approval, or None (a compensation never does)."""
    if command.operation == "compensate":
        return None
    if requires_approval:
        return f"tool {command.tool} requires approval for every call"
    # workflow=None: the tool does not know the run's workflow; a rule restricted to workflows applies.
    return policy.approval_reason(command.tool, command.arguments, workflow=None, environment=environment)


def unapproved(
    command: ToolCommand,
    requires_approval: bool,
    policy: Policy,
    environment: str,
    keys: CommandKeys,
    at: datetime | None = None,
) -> Rejected | None:
    """The refusal of ``command`` if it needs approval and carries no valid token, else None."""
    needed = approval_needed(command, requires_approval, policy, environment)
    if needed is None:
        return None
    problem = approval.check(command, keys, at)
    if problem is None:
        return None
    return Rejected("unapproved", f"{problem}; approval needed: {needed} (policy {policy.version})")
