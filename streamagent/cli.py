"""``streamagent``: run the stack, submit work, inspect runs, operate topics and dead letters."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamagent import logs
from streamagent.config import Settings, get_settings

log = logging.getLogger("streamagent")


def _settings(require: tuple[str, ...] = ()) -> Settings:
    from streamagent.stack import discover

    settings = discover(get_settings())
    missing = [name for name in require if not getattr(settings, name)]
    if missing:
        env = ", ".join("STREAMAGENT_" + m.upper() for m in missing)
        raise SystemExit(f"error: set {env}, or start the embedded stack with `streamagent up` first")
    return settings


# -- stack -------------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from streamagent.stack import Stack

    settings = get_settings()
    stack = Stack(settings).start()
    s = stack.settings
    print(f"bootstrap servers: {s.bootstrap_servers}")
    print(f"database url:      {s.database_url}")
    print(f"sandbox url:       {s.sandbox_url}")
    print(f"logs:              {s.data_dir / 'logs'}")
    print("running: " + ", ".join(stack.children) + " (Ctrl-C to stop)", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    print("stopping…", flush=True)
    stack.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streamagent.demo import run_demo

    return run_demo(get_settings(), runs=args.runs, timeout_s=args.timeout)


def cmd_topics_create(args: argparse.Namespace) -> int:
    from streamagent.kafka import create_topics

    settings = _settings(("bootstrap_servers",))
    if args.partitions:
        settings = settings.model_copy(update={"partitions": args.partitions})
    created = create_topics(settings)
    print(f"created {len(created)} topic(s): {', '.join(created) or 'none, all existed'}")
    return 0


def cmd_processor(args: argparse.Namespace) -> int:
    settings = _settings(("bootstrap_servers", "database_url") if args.name != "state" else ("bootstrap_servers",))
    logs.configure(f"processor-{args.name}", settings.log_level, settings.log_format)
    _serve_metrics(settings, f"processor-{args.name}")
    if args.name == "state":
        from processors.state.app import run

        run(settings)
        return 0
    from streamagent.runtime import run_until_signalled

    if args.name == "decision":
        from processors.decision.processor import build
    else:
        from processors.projection.processor import build
    run_until_signalled(build(settings))
    return 0


def cmd_tool(args: argparse.Namespace) -> int:
    from tools import builtin_tools
    from tools.sdk.runner import run_tool

    settings = _settings(("bootstrap_servers", "database_url", "sandbox_url"))
    logs.configure(f"tool-{args.name}", settings.log_level, settings.log_format)
    _serve_metrics(settings, f"tool-{args.name}")
    run_tool(settings, builtin_tools()[args.name]())
    return 0


def _serve_metrics(settings: Settings, name: str) -> None:
    from streamagent.metrics import serve

    serve(settings.metrics_port, name, settings.data_dir / "metrics")


# -- submit / inspect --------------------------------------------------------------------------------
REQUEST_FIELDS = ("company_name", "company_domain", "contact_name", "contact_email", "goal", "requested_by")


def cmd_submit(args: argparse.Namespace) -> int:
    from streamagent.submit import InvalidRequest, build_request, produce_requests, read_jsonl

    try:
        if args.file:
            requests = read_jsonl(Path(args.file))
        else:
            fields: dict[str, Any] = {f: getattr(args, f) for f in REQUEST_FIELDS}
            fields.update(run_id=args.run_id, deadline_s=args.deadline_s)
            requests = [build_request(fields)]
    except InvalidRequest as exc:
        print(f"error: invalid request, nothing was submitted:\n{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = _settings(("bootstrap_servers",))
    run_ids = produce_requests(settings, requests)
    for run_id in run_ids:
        print(run_id)
    if not args.wait:
        return 0
    from streamagent.demo import wait_for_runs

    final = wait_for_runs(_settings(("database_url",)), run_ids, args.timeout, progress=True)
    return 0 if all(row.status == "completed" for row in final) and len(final) == len(run_ids) else 1


def cmd_show(args: argparse.Namespace) -> int:
    from streamagent import queries

    settings = _settings(("database_url",))
    row = queries.run(settings, args.run_id)
    if row is None:
        print(f"error: no run {args.run_id}", file=sys.stderr)
        return 1
    entries = queries.timeline(settings, args.run_id)
    if args.json:
        print(
            json.dumps(
                {
                    "run": row.model_dump(mode="json"),
                    "timeline": [e.model_dump(mode="json") for e in entries],
                },
                indent=2,
            )
        )
        return 0
    print(f"run {row.run_id}  {row.company_name or '?'}  status={row.status}  steps done={row.steps_done}/4")
    if row.reason:
        print(f"reason: {row.reason}")
    start = entries[0].occurred_at if entries else None
    for e in entries:
        offset = (e.occurred_at - start).total_seconds() * 1000 if start else 0
        print(f"  +{offset:8.0f} ms  {e.type:<20} {e.step or '':<7} {e.summary}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from streamagent import queries

    rows = queries.runs(_settings(("database_url",)), status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return 0
    print_runs_table(rows)
    return 0


def print_runs_table(rows: list[Any]) -> None:
    print(f"{'run id':<36}  {'company':<24} {'status':<10} {'steps':>5} {'duration':>9}")
    for r in rows:
        duration = f"{r.duration_s:.2f}s" if r.duration_s is not None else "-"
        print(f"{r.run_id:<36}  {(r.company_name or '?')[:24]:<24} {r.status:<10} {r.steps_done:>3}/4 {duration:>9}")


# -- dead letters ------------------------------------------------------------------------------------
def cmd_dlq_list(args: argparse.Namespace) -> int:
    from streamagent.dlq_ops import read_dead_letters

    letters = read_dead_letters(_settings(("bootstrap_servers",)), reason=args.reason)
    if args.json:
        print(json.dumps([letter.summary() for letter in letters], indent=2))
        return 0
    print(f"{'offset':>8}  {'processor':<14} {'reason':<16} {'source':<40} error")
    for letter in letters:
        source = f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
        print(
            f"{letter.dlq_partition}:{letter.dlq_offset:<6}  {letter.processor:<14} {letter.reason:<16} "
            f"{source:<40} {letter.error[:80]}"
        )
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from streamagent.dlq_ops import read_dead_letters, replay

    settings = _settings(("bootstrap_servers",))
    letters = read_dead_letters(settings, reason=args.reason)
    if args.offset:
        wanted = set(args.offset)
        letters = [x for x in letters if f"{x.dlq_partition}:{x.dlq_offset}" in wanted]
    elif not args.reason and not args.all:
        print("error: choose what to replay with --offset P:O, --reason R or --all", file=sys.stderr)
        return 2
    count = replay(settings, letters)
    print(f"replayed {count} dead letter(s) to their source topics")
    return 0


# -- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from streamagent.sandbox.cli import register as register_sandbox
    from streamagent.topics import TOOLS

    parser = argparse.ArgumentParser(
        prog="streamagent",
        description="A durable, event-driven runtime for AI agents on Kafka. Addresses come from "
        "STREAMAGENT_BOOTSTRAP_SERVERS / STREAMAGENT_DATABASE_URL / STREAMAGENT_SANDBOX_URL; unset, "
        "the embedded broker and PostgreSQL are started (up, demo) or found (other commands).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    demo = add("demo", cmd_demo, "Start the embedded stack, run onboarding requests end to end, print a summary")
    demo.add_argument("--runs", type=int, default=5, help="how many onboarding requests to submit (default 5)")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every run (default 120)")

    add(
        "up",
        cmd_up,
        "Run the whole embedded stack in the foreground until Ctrl-C, restarting children that die",
    )

    submit = add("submit", cmd_submit, "Submit onboarding requests, as an upstream system would")
    submit.add_argument("--company-name")
    submit.add_argument("--company-domain", help="e.g. acme.io")
    submit.add_argument("--contact-name")
    submit.add_argument("--contact-email")
    submit.add_argument("--goal", default="onboard new client")
    submit.add_argument("--requested-by")
    submit.add_argument("--run-id", help="defaults to a new uuid")
    submit.add_argument("--deadline-s", type=float, help="seconds the run may take")
    submit.add_argument("--file", help="JSON-lines file, one request object per line (fields as the flags)")
    submit.add_argument("--wait", action="store_true", help="wait until every submitted run has ended")
    submit.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits (default 120)")

    show = add("show", cmd_show, "Print one run's timeline: request, decisions, commands, results")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true", help="machine-readable output")

    runs = add("runs", cmd_runs, "List runs with their status")
    runs.add_argument("--status", choices=["running", "completed", "failed", "escalated"])
    runs.add_argument("--limit", type=int, default=1000)
    runs.add_argument("--json", action="store_true", help="machine-readable output")

    topics = add("topics", lambda a: (topics.print_help(), 2)[1], "Manage the runtime's topics")
    topics_sub = topics.add_subparsers(dest="topics_command", metavar="SUBCOMMAND")
    create = topics_sub.add_parser(
        "create",
        help="Create every topic (idempotent)",
        description="Create every topic the runtime uses; existing ones are left alone",
    )
    create.add_argument("--partitions", type=int, help="partition count (default STREAMAGENT_PARTITIONS or 4)")
    create.set_defaults(func=cmd_topics_create)

    processor = add("processor", cmd_processor, "Run one processor in the foreground")
    processor.add_argument("name", choices=["state", "decision", "projection"])

    tool = add("tool", cmd_tool, "Run one tool (its own consumer group) in the foreground")
    tool.add_argument("name", choices=list(TOOLS))

    dlq = add("dlq", lambda a: (dlq.print_help(), 2)[1], "Inspect and replay dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="SUBCOMMAND")
    dlq_list = dlq_sub.add_parser(
        "list",
        help="List dead letters with their reason and source",
        description="List dead letters with their reason and source",
    )
    dlq_list.add_argument("--reason", help="only this reason")
    dlq_list.add_argument("--json", action="store_true", help="machine-readable output")
    dlq_list.set_defaults(func=cmd_dlq_list)
    dlq_replay = dlq_sub.add_parser(
        "replay",
        help="Put dead letters back on their source topic",
        description="Put chosen dead letters back on their source topic, byte for byte",
    )
    dlq_replay.add_argument("--offset", action="append", help="P:O of a dead letter (repeatable)")
    dlq_replay.add_argument("--reason", help="every dead letter with this reason")
    dlq_replay.add_argument("--all", action="store_true", help="every dead letter")
    dlq_replay.set_defaults(func=cmd_dlq_replay)

    register_sandbox(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("up", "demo", "submit", "topics", "show", "runs", "dlq"):
        settings = get_settings()
        logs.configure(args.command, "WARNING" if args.command in ("demo",) else settings.log_level, "text")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
