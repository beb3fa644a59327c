"""What the page's approvals view shows: each step the guard holds for a person, and how to answer it.

Built from the projection's pending requests (``queries.approvals``) with the same words as
``streamagent approvals``: the telling arguments of the held command (for an email, its recipient and
subject) and the rule that held it. The page cannot answer (it has no login, so it stays read-only);
each request carries the exact command lines that do, for an operator to copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from streamagent.console.tables import answer_command, human_age
from streamagent.processors.projection.processor import telling_arguments
from streamagent.processors.projection.queries import ApprovalRow, RunRow

# A placeholder the operator replaces: a denial without a reason teaches nobody anything.
DENY_NOTE = "WHY"


def pending_approval(row: ApprovalRow, run: RunRow | None, at: datetime) -> dict[str, Any]:
    """One held step: what it would do, why it is held, since when, until when, and how to answer."""
    left = (row.expires_at - at).total_seconds()
    return {
        "request_id": row.request_id,
        "run_id": row.run_id,
        "run_short": row.run_id[:8],
        "company_name": run.company_name if run else None,
        "workflow": run.workflow if run else None,
        "step": row.step,
        "tool": row.tool,
        "what": telling_arguments(row.arguments),
        "arguments": row.arguments,
        "reason": row.reason,
        "policy_version": row.policy_version,
        "requested_at": row.requested_at.isoformat(),
        "expires_at": row.expires_at.isoformat(),
        "age": human_age(at - row.requested_at),
        # Past its expiry, a request stays pending until the state processor's timer expires it.
        "expires_in": human_age(row.expires_at - at) if left > 0 else None,
        "approve": answer_command("approve", row.run_id, row.step),
        "deny": answer_command("deny", row.run_id, row.step, DENY_NOTE),
    }


def approvals_view(rows: Sequence[ApprovalRow], runs: Mapping[str, RunRow], at: datetime) -> dict[str, Any]:
    """The pending requests, oldest first (the longest wait at the top), and how many runs they hold."""
    return {
        "approvals": [pending_approval(r, runs.get(r.run_id), at) for r in rows if r.status == "requested"],
        "waiting_runs": len({r.run_id for r in rows if r.status == "requested"}),
        "at": at.isoformat(),
    }
