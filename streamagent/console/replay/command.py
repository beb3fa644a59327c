"""``streamagent replay`` and ``streamagent replay decisions``: what they print and their exit codes.

``replay`` (exit 0: the rebuild matches the live state; 1: it does not; 2: a usage mistake)
    reads the log, rebuilds beside the live state, verifies, prints the differences, and drops its schema
    unless ``--keep`` (to query it) or ``--apply`` (to make it live, only with the stack stopped).
``replay decisions`` (exit 0: the candidate decides like the recorded decisions; 1: some differ)
    re-decides each recorded decision with the inputs it had (snapshot, approvals, catalogue as of then)
    and the candidate's workflows and policy; a decision whose catalogue is not known exactly is counted
    and explained, not compared, and is no difference.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from streamagent.config import Settings

from .apply import Refused, apply, live_writers
from .decisions import KINDS, NOT_COMPARED, UnknownRuns, candidate, replay_decisions
from .progress import ProgressLine
from .rebuild import Scope, drop_schema, rebuild
from .verify import live_states, same_state, verify

SHOWN = 5


class Usage(ValueError):
    """A mistake in the command line: one line, exit 2."""


@dataclass(frozen=True)
class ReplayOptions:
    scope: Scope
    apply: bool = False
    keep: bool = False
    verify: bool = True
    json: bool = False
    own_lock: bool = False  # this process started the broker and PostgreSQL alone (see ``live_writers``)


def run_replay(settings: Settings, options: ReplayOptions) -> int:
    if options.apply and not options.scope.full:
        raise Usage("--apply rebuilds everything, so it takes a full replay (no --runs, --from or --until)")
    why = live_writers(settings, options.own_lock)
    if options.apply and why is not None:  # first: refuse before reading anything
        raise Refused(f"{why}: stop it before --apply (a replay without --apply is safe while it runs)")
    running = why is not None
    progress = ProgressLine()
    rebuilt = rebuild(settings, options.scope, progress)
    progress.end()
    try:
        unknown = sorted(options.scope.runs - set(rebuilt.states)) if options.scope.runs else []
        if unknown:
            raise Usage(f"--runs: no run {', '.join(unknown)} in the log (nothing to replay or compare for it)")
        total_s = rebuilt.seconds
        rate = rebuilt.events / total_s if total_s else 0.0
        letters = Counter((x.processor, x.reason) for x in rebuilt.letters)
        print(
            f"replayed {rebuilt.events:,} events of {len(rebuilt.run_ids):,} runs in {total_s:.1f}s"
            f" ({rate:,.0f} events/s:"
            f" read {rebuilt.read.seconds:.1f}s, fold {rebuilt.fold_s:.1f}s, project {rebuilt.project_s:.1f}s);"
            f" {rebuilt.skipped:,} records out of scope"
        )
        statuses = Counter(s.snapshot.status.value for s in rebuilt.states.values())
        print(
            "state:",
            ", ".join(f"{n} {k}" for k, n in sorted(statuses.items())) or "no runs",
            f"· {sum(len(v) for v in rebuilt.snapshots.values()):,} snapshots the fold publishes",
        )
        if letters:
            print(
                "dead letters the live processes would have sent (none sent now):",
                ", ".join(f"{n} {p}/{r}" for (p, r), n in sorted(letters.items())),
            )
        if options.scope.until is not None:
            print(f"state as of {options.scope.until.isoformat()}: not compared with the live state (that is now)")
            if options.json:
                print(
                    json.dumps({"events": rebuilt.events, "runs": len(rebuilt.run_ids), "seconds": round(total_s, 3)})
                )
            return 0
        code = 0
        if options.verify:
            report = verify(settings, rebuilt)
            where = "a running stack: runs ahead or behind are in flight" if running else "the stack is stopped"
            print(f"verification against the live state ({where}):")
            print("\n".join(report.lines()))
            clean = report.clean(strict=not running)
            if not options.apply:
                print(
                    "identical"
                    if clean and report.count("behind") + report.count("ahead") == 0
                    else "no differences"
                    if clean
                    else "DIFFERENCES: see above"
                )
                code = 0 if clean else 1
            if options.json:
                print(
                    json.dumps(
                        {
                            "events": rebuilt.events,
                            "runs": len(rebuilt.run_ids),
                            "seconds": round(total_s, 3),
                            **{k: report.count(k) for k in ("differ", "behind", "ahead")},
                        }
                    )
                )
            if options.apply:
                differ = report.count("differ")
                if differ:
                    print(f"note: {differ} run(s) differ; --apply makes the rebuilt ones live (the log is the truth)")
        elif options.json:  # --no-verify: the figures of the rebuild alone, still one line of JSON
            print(json.dumps({"events": rebuilt.events, "runs": len(rebuilt.run_ids), "seconds": round(total_s, 3)}))
        if options.apply:
            projected, written = apply(settings, rebuilt, live_states(settings), options.own_lock)
            print(
                f"applied: projection swapped in ({projected:,} runs), {written:,} run state(s) written to the"
                " state table's changelog; start the stack to carry on"
            )
            after = verify_after(settings, rebuilt)
            print("after --apply: " + ("identical" if after else "DIFFERENCES remain"))
            code = 0 if after else 1
        elif options.keep:
            print(
                f"rebuilt projection kept in schema {rebuilt.schema}"
                f" (drop it with DROP SCHEMA {rebuilt.schema} CASCADE)"
            )
        return code
    finally:
        if not options.keep:
            drop_schema(settings, rebuilt.schema)  # a no-op after --apply moved its tables out


def verify_after(settings: Settings, rebuilt: object) -> bool:
    """After --apply: the changelog and the (now live) projection hold exactly the rebuild."""
    from .rebuild import Rebuilt

    assert isinstance(rebuilt, Rebuilt)
    live = live_states(settings)
    return all(same_state(live.get(run_id), state) for run_id, state in rebuilt.states.items())


def run_decisions(
    settings: Settings,
    which: str,
    runs: list[str] | None,
    since: datetime | None,
    limit: int | None,
    as_json: bool = False,
) -> int:
    chosen = candidate(settings, which)
    progress = ProgressLine()
    try:
        report = replay_decisions(settings, chosen, runs, since, limit, progress)
    except UnknownRuns as exc:
        raise Usage(str(exc)) from None
    finally:
        progress.end()
    counts = report.counts()
    not_compared = sum(counts[k] for k in NOT_COMPARED)
    print(
        f"re-decided {len(report.compared) - not_compared:,} of {len(report.compared):,} recorded"
        f" decisions with the {which} decider ({settings.workflows_dir}) and policy {report.policy_version}"
        f" ({settings.policies_dir}), each with its run's approvals, the tool catalogue and the shared memory"
        f" as of that decision,"
        f" in {report.seconds:.1f}s; nothing was produced, no tool was called"
    )
    for kind in KINDS:
        print(f"  {counts[kind]:>6}  {kind}")
    differing = report.differing()
    if report.missing_snapshots:
        print(f"  ({report.missing_snapshots} had no snapshot to re-decide: neither the topic nor the log held it)")
    unknown = report.unknown()
    if unknown:
        reasons = Counter(c.why for c in unknown)
        print(f"{len(unknown)} decision(s) not compared: the catalogue or memory as of them is not known exactly")
        for why, n in reasons.most_common(SHOWN):
            print(f"  {n:>6}  {why}")
    if report.other_policies:
        versions = ", ".join(f"{v} ({n})" for v, n in sorted(report.other_policies.items()))
        print(
            f"note: {sum(report.other_policies.values())} re-decided decision(s) were recorded under another"
            f" policy version than the candidate's {report.policy_version}: {versions}"
        )
    if differing:
        runs_hit = sorted({c.run_id for c in differing})
        print(f"{len(differing)} decision(s) of {len(runs_hit)} run(s) differ; the first {min(SHOWN, len(differing))}:")
        for c in differing[:SHOWN]:
            print("\n".join(c.lines()))
    if as_json:
        print(
            json.dumps(
                {
                    "counts": counts,
                    "differing": [{"run_id": c.run_id, "version": c.version, "kind": c.kind} for c in differing],
                    "catalogue_unknown": [{"run_id": c.run_id, "version": c.version, "why": c.why} for c in unknown],
                }
            )
        )
    return 1 if differing else 0
