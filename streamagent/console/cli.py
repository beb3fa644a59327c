"""``streamagent``: run the stack, submit work, inspect runs, operate topics and dead letters."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamagent import logs
from streamagent.config import Settings, SettingsError, get_settings
from streamagent.console.errors import CliError

if TYPE_CHECKING:
    from streamagent.authn import RoleKeys
    from streamagent.events import Event

log = logging.getLogger("streamagent")

# How long a command a person runs waits for the broker or PostgreSQL to answer before saying it
# cannot reach it (the whole command then fails within a few seconds, not after client timeouts).
# `streamagent tool mcp --server NAME` runs an MCP server's tools (streamagent.tools.mcp), not a tool of that name.
MCP = "mcp"
PROBE_TIMEOUT_S = 2.5
_ENV = {
    "bootstrap_servers": "STREAMAGENT_BOOTSTRAP_SERVERS",
    "database_url": "STREAMAGENT_DATABASE_URL",
    "sandbox_url": "STREAMAGENT_SANDBOX_URL",
}


def _settings(require: tuple[str, ...] = (), *, probe: bool = True) -> Settings:
    """The settings, with addresses filled in from a running ``streamagent up`` in the data dir; every
    address in ``require`` must be known and (broker, database) must answer within a few seconds."""
    from streamagent.console.devstack.stackfile import discover

    given = get_settings()
    settings = discover(given)
    missing = [name for name in require if not getattr(settings, name)]
    if missing:
        env = ", ".join(_ENV[m] for m in missing)
        raise CliError(
            f"no running stack in {settings.data_dir.resolve()} (start one with `streamagent up`)"
            f" and {env} {'is' if len(missing) == 1 else 'are'} not set"
        )
    for name in require if probe else ():
        source = _ENV[name] if getattr(given, name) else f"from {settings.data_dir.resolve() / 'stack.json'}"
        if name == "bootstrap_servers":
            _require_broker(settings.bootstrap_servers, source)
        elif name == "database_url":
            _require_database(settings.database_url, source)
    return settings


def _run_id(settings: Settings, given: str) -> str:
    """The run id a user typed: the whole id or any unique prefix of at least six characters."""
    from streamagent.processors.projection import queries

    try:
        found = queries.resolve_run(settings, given)
    except queries.AmbiguousRun as exc:
        more = "" if len(exc.candidates) <= 10 else " …"
        raise CliError(
            f"run id prefix {given!r} matches several runs: {', '.join(exc.candidates[:10])}{more}; give more of it"
        ) from None
    if found is None:
        short = len(given) < queries.MIN_PREFIX
        hint = f" (a prefix needs at least {queries.MIN_PREFIX} characters)" if short else ""
        raise CliError(f"no run {given}{hint}")
    return found


def _require_broker(bootstrap: str, source: str) -> None:
    from streamagent.kafka import probe

    problem = probe(bootstrap, PROBE_TIMEOUT_S)
    if problem is not None:
        raise CliError(f"cannot reach the Kafka broker at {bootstrap} ({source}) within {PROBE_TIMEOUT_S}s: {problem}")


def _require_database(url: str, source: str) -> None:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=max(2, round(PROBE_TIMEOUT_S))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CliError(f"cannot reach PostgreSQL at {_redact(url)} ({source}): {reason}") from None


def _redact(url: str) -> str:
    """A URL fit for a message: no password."""
    return re.sub(r"(://[^:/@]*:)[^@/]+@", r"\1***@", url)


# -- stack -------------------------------------------------------------------------------------------
def _report(line: str) -> None:
    """What the stack reports (a child that died, and why) on the terminal of `up` and `demo`."""
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _require_given(settings: Settings) -> None:
    """``up`` and ``demo`` start what is unset; what is set must answer, and the sandbox's faults must
    parse, before anything starts."""
    from streamagent.tools.sandbox.cli import load_faults

    try:
        load_faults([], settings.sandbox_faults)
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None
    _workflows(settings)  # a malformed workflow file is refused before anything starts
    _policy(settings)  # and a malformed policy file
    from streamagent.console.devstack.members import MembersError, parse_members
    from streamagent.console.devstack.stack import PROCESSORS, UnknownTool, stack_tools

    try:
        parse_members(settings.stack_members, PROCESSORS, stack_tools(settings))
    except (UnknownTool, MembersError) as exc:
        raise CliError(str(exc), code=2) from None
    if settings.metrics_port:
        raise CliError(
            f"STREAMAGENT_METRICS_PORT={settings.metrics_port} would give every process of the stack the same port;"
            f" leave it unset here: each process picks a free one and writes it to {settings.data_dir / 'metrics'}",
            code=2,
        )
    if settings.bootstrap_servers:
        _require_broker(settings.bootstrap_servers, _ENV["bootstrap_servers"])
    if settings.database_url:
        _require_database(settings.database_url, _ENV["database_url"])


def _workflows(settings: Settings) -> dict[str, Any]:
    """The workflows of ``workflows_dir``; a malformed file is one line naming file, field and reason."""
    from streamagent.processors.workflow import WorkflowError, load_workflows

    try:
        return load_workflows(settings.workflows_dir)
    except WorkflowError as exc:
        raise CliError(f"invalid workflow: {exc}", code=2) from None


def cmd_workflows_check(args: argparse.Namespace) -> int:
    for name, workflow in _workflows(get_settings()).items():
        steps = " -> ".join(f"{s.name}({s.tool})" for s in workflow.steps)
        print(f"ok  {name}: {steps}  [{workflow.source}]")
    return 0


def _policy(settings: Settings) -> Any:
    """The policy of ``policies_dir``; a malformed file is one line naming file, field and reason (exit 2)."""
    from streamagent.policy import PolicyError, load_policy

    try:
        return load_policy(settings.policies_dir)
    except PolicyError as exc:
        raise CliError(f"invalid policy: {exc}", code=2) from None


def cmd_policies_check(args: argparse.Namespace) -> int:
    from streamagent.policy import BUDGETS

    settings = get_settings()
    policy = _policy(settings)

    def limits(budgets: Any) -> str:
        set_ = [f"{name}={getattr(budgets, name):g}" for name in BUDGETS if getattr(budgets, name) is not None]
        return ", ".join(set_) or "none"

    print(f"ok  policy {policy.version} from {settings.policies_dir.resolve()} (environment {settings.environment})")
    for path in policy.files or ("(no *.toml file: nothing is held, no budget)",):
        print(f"    file {path}")
    print(f"    budgets: {limits(policy.budgets)}")
    for name, budgets in sorted(policy.workflow_budgets.items()):
        print(f"    budgets of workflow {name}: {limits(budgets)}")
    print(f"    approvals: {len(policy.rules)} rule(s), unanswered for {policy.approval_timeout_s:g}s escalates")
    for rule in policy.rules:
        where = [f"tool={rule.tool}"]
        if rule.argument is not None:
            where.append(f"argument={rule.argument}")
        if rule.matching is not None:
            where.append(f"matching={rule.matching.pattern!r}")
        if rule.not_matching is not None:
            where.append(f"not_matching={rule.not_matching.pattern!r}")
        if rule.environments:
            where.append(f"environments={','.join(rule.environments)}")
        if rule.workflows:
            where.append(f"workflows={','.join(rule.workflows)}")
        print(f"      {' '.join(where)}: {rule.reason}  [{rule.source}]")
    rates = ", ".join(f"{tool}={rate:g}/s" for tool, rate in sorted(policy.rate_limits.items()))
    print(f"    rate limits (per tool process): {rates or 'none'}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from streamagent.console.devstack.stack import Stack, StackRunning, running_pid

    settings = get_settings()
    pid = running_pid(settings.data_dir.resolve())
    if pid is not None:  # said before anything else; Stack.start checks again under the lock
        raise StackRunning(settings.data_dir.resolve(), pid)
    _require_given(settings)
    # A port in use (broker, sandbox, page) is refused by Stack.start, in one line naming its setting: only
    # once it holds the data dir's lock, after the leftovers of a `kill -9`-ed `up` (which held the very
    # same ports) have ended.
    began = time.monotonic()
    print(f"starting the stack in {settings.data_dir.resolve()}…", flush=True)
    # Until it is up, Ctrl-C or SIGTERM interrupts the start, which stops whatever was started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    # STREAMAGENT_UI_PORT=0: no page (`streamagent ui` can serve it later, on any port).
    stack = Stack(settings, report=_report, ui_port=settings.ui_port or None).start()
    s = stack.settings
    print(f"bootstrap servers: {s.bootstrap_servers}")
    print(f"database url:      {_redact(s.database_url)}")
    print(f"sandbox url:       {s.sandbox_url}")
    print(f"run timeline page: {stack.ui_url or 'off (STREAMAGENT_UI_PORT=0)'}")
    print(f"logs:              {s.data_dir / 'logs'}")
    print(f"up in {time.monotonic() - began:.1f}s (pid {os.getpid()}); running: " + ", ".join(stack.children))
    print("Ctrl-C stops everything", flush=True)

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            return
        killed = stack.force_stop()  # a second Ctrl-C: do not wait for anyone
        print(f"forced: killed {', '.join(killed) or 'nothing'}", file=sys.stderr, flush=True)
        os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    while not stopping.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    print("stopping… (Ctrl-C again to force)", flush=True)
    began = time.monotonic()
    stopped = stack.stop()
    print(f"stopped {len(stopped)} process(es) in {time.monotonic() - began:.1f}s: {', '.join(stopped)}", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streamagent.console.demo import run_demo

    settings = get_settings()
    _require_given(settings)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the demo's stack as Ctrl-C does
    return run_demo(settings, runs=args.runs, timeout_s=args.timeout, report=_report)


# -- the run timeline page ---------------------------------------------------------------------------
def cmd_ui(args: argparse.Namespace) -> int:
    from streamagent.console.ui import serve

    # Dead letters are read from Kafka when the page asks for them; without a broker the page says so.
    settings = _settings(("database_url",))
    port = settings.ui_port if args.port is None else args.port
    host = settings.ui_host if args.host is None else args.host
    try:
        server = serve(settings, host, port)
    except OSError as exc:
        raise CliError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another with --port"
            " or STREAMAGENT_UI_PORT (0 picks a free one)",
            code=2,
        ) from None
    print(f"run timeline page: {server.url}  (read-only; Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the stack stops it as Ctrl-C does
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return value


def cmd_topics_create(args: argparse.Namespace) -> int:
    from streamagent.console.devstack.stack import stack_tools
    from streamagent.kafka import create_topics
    from streamagent.topics import all_topics

    settings = _settings(("bootstrap_servers",))
    if args.partitions:
        settings = settings.model_copy(update={"partitions": args.partitions})
    # The runtime's topics and the command topics of the tools the stack runs (any other tool creates
    # its own when it is deployed).
    created = create_topics(settings, all_topics(stack_tools(settings)))
    print(f"created {len(created)} topic(s): {', '.join(created) or 'none, all existed'}")
    return 0


def cmd_processor(args: argparse.Namespace) -> int:
    # No probe: a child of `up` that starts while the broker restarts waits in its client, not exits.
    # The state, intake and memory processors use Kafka only; the others also PostgreSQL.
    kafka_only = ("state", "intake", "memory")
    required = ("bootstrap_servers",) if args.name in kafka_only else ("bootstrap_servers", "database_url")
    settings = _settings(required, probe=False)
    if args.name in ("state", "decision"):
        _workflows(settings)  # a malformed workflow file: one line, before anything connects
    if args.name in ("decision", "memory"):
        from streamagent.signing import load_keys

        load_keys(settings)  # it signs what it writes: no key, no start (one line naming the setting)
    logs.configure(f"processor-{args.name}", settings.log_level, settings.log_format)
    _serve_metrics(settings, f"processor-{args.name}")
    if args.name == "state":
        from streamagent.processors.state.app import run

        run(settings)
        return 0
    from streamagent.runtime import run_until_signalled

    if args.name == "decision":
        from streamagent.processors.decision.processor import build
    elif args.name == "intake":
        from streamagent.processors.intake.processor import build
    elif args.name == "memory":
        from streamagent.processors.memory.processor import build
    else:
        from streamagent.processors.projection.processor import build
    run_until_signalled(build(settings))
    return 0


def cmd_tool(args: argparse.Namespace) -> int:
    from streamagent.approval import load_approval_keys
    from streamagent.config import parse_tool_urls
    from streamagent.signing import load_keys
    from streamagent.tools import builtin_tools
    from streamagent.tools.sdk.runner import run_tool

    own_api = args.name in parse_tool_urls(get_settings().tool_urls)  # then the sandbox need not be running
    needs = ("bootstrap_servers", "database_url") if own_api else ("bootstrap_servers", "database_url", "sandbox_url")
    settings = _settings(needs, probe=False)
    load_keys(settings)  # it verifies every command: no key, no start (one line naming the setting)
    load_approval_keys(settings)  # and every approval token
    _policy(settings)  # it enforces the policy: a malformed file, no start
    if args.name == MCP:
        return _tool_mcp(args, settings)
    if args.server or args.tool:
        raise CliError(f"--server and --tool are options of `streamagent tool {MCP}`, not of tool {args.name}", 2)
    logs.configure(f"tool-{args.name}", settings.log_level, settings.log_format)
    _serve_metrics(settings, f"tool-{args.name}")
    run_tool(settings, builtin_tools()[args.name]())
    return 0


def _tool_mcp(args: argparse.Namespace, settings: Settings) -> int:
    """``streamagent tool mcp --server NAME [--tool T ...]``: the server's exposed tools (docs/guides/mcp.md)."""
    from streamagent.tools.mcp import config as mcp_config
    from streamagent.tools.mcp.runner import run_mcp_server, select

    if not args.server:
        raise CliError(f"tool {MCP} needs --server NAME (a server of {settings.mcp_config_path})", 2)
    try:
        server = mcp_config.server(settings.mcp_config_path, args.server)
        select(server, args.tool or ())
    except mcp_config.McpConfigError as exc:
        raise CliError(str(exc), 2) from None
    name = f"mcp-{args.server}"
    logs.configure(f"tool-{name}", settings.log_level, settings.log_format)
    _serve_metrics(settings, f"tool-{name}")
    try:
        run_mcp_server(settings, args.server, server, args.tool or ())
    except mcp_config.McpConfigError as exc:  # found only once the server listed its tools
        raise CliError(str(exc), 2) from None
    return 0


def _serve_metrics(settings: Settings, name: str) -> None:
    from streamagent.metrics import serve

    serve(settings.metrics_port, name, settings.data_dir / "metrics")
    if settings.otlp_endpoint:  # off by default: then not even imported
        import atexit

        from streamagent import tracing

        if tracing.configure(settings, name):
            atexit.register(tracing.shutdown)  # exports the spans still buffered


# -- submit / inspect --------------------------------------------------------------------------------
REQUEST_FIELDS = ("company_name", "company_domain", "contact_name", "contact_email", "goal", "requested_by")
# What a flag holds when it was not given (a flag with a default is "given" only when it differs).
SUBMIT_DEFAULTS = {"goal": "onboard new client"}


def cmd_submit(args: argparse.Namespace) -> int:
    from streamagent.submit import InvalidRequest, build_request, produce_requests, read_jsonl

    known = set(_workflows(get_settings()))
    skipped: list[str] = []
    if args.file:
        given = [f"--{f.replace('_', '-')}" for f in (*REQUEST_FIELDS, "run_id", "deadline_s", "workflow")
                 if getattr(args, f) not in (None, SUBMIT_DEFAULTS.get(f))]  # fmt: skip
        if given:
            raise CliError(f"--file takes every field from the file; {', '.join(given)} cannot go with it", code=2)
    elif args.skip_invalid:
        raise CliError("--skip-invalid goes with --file (a request given by flags is one request)", code=2)
    try:
        if args.file:
            requests, skipped = read_jsonl(Path(args.file), known, skip_invalid=args.skip_invalid)
        else:
            fields: dict[str, Any] = {f: getattr(args, f) for f in REQUEST_FIELDS}
            fields.update(run_id=args.run_id, deadline_s=args.deadline_s, workflow=args.workflow)
            requests = [build_request(fields, known)]
    except InvalidRequest as exc:
        sep = "\n" if "\n" in str(exc) else " "  # one problem: one line
        print(f"error: invalid request, nothing was submitted:{sep}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}", code=2) from None
    for problem in skipped:
        print(f"skipped {problem}", file=sys.stderr)
    if not requests:
        raise CliError(f"no valid request in {args.file}; nothing was submitted", code=2)
    settings = _settings(("bootstrap_servers", "database_url") if args.wait else ("bootstrap_servers",))
    run_ids = produce_requests(settings, requests)
    for run_id in run_ids:
        print(run_id)
    if not args.wait:
        return 0
    from streamagent.console.demo import wait_for_runs

    final = wait_for_runs(settings, run_ids, args.timeout, progress=True)
    return 0 if all(row.status == "completed" for row in final) and len(final) == len(run_ids) else 1


def cmd_show(args: argparse.Namespace) -> int:
    from streamagent.processors.projection import queries

    settings = _settings(("database_url",))
    run_id = _run_id(settings, args.run_id)
    row = queries.run(settings, run_id)
    if row is None:
        raise CliError(f"no run {args.run_id}")
    entries = queries.timeline(settings, run_id)
    children = queries.children(settings, run_id)
    from streamagent.console.timeline import plan_of

    if args.json:
        print(
            json.dumps(
                {
                    "run": row.model_dump(mode="json"),
                    "children": [c.model_dump(mode="json") for c in children],
                    "plan": plan.model_dump(mode="json") if (plan := plan_of(entries)) is not None else None,
                    "timeline": [e.model_dump(mode="json") for e in entries],
                },
                indent=2,
            )
        )
        return 0
    from streamagent.console.tables import steps_per_workflow
    from streamagent.console.timeline import print_timeline

    print_timeline(
        row,
        entries,
        steps_per_workflow(settings),
        context=args.context or args.full,
        full=args.full,
        children=children,
    )
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from streamagent.processors.projection import queries

    settings = _settings(("database_url",))
    before = _run_id(settings, args.before) if args.before else None
    rows = queries.runs(settings, status=args.status, limit=args.limit, before=before)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return 0
    from streamagent.console.tables import print_runs_table, steps_per_workflow

    print_runs_table(rows, steps_per_workflow(settings))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from streamagent.processors.projection import queries, report

    settings = _settings(("database_url",))
    until = datetime.now(UTC)
    since = None if args.since is None else until - args.since
    rows = queries.quality(settings, since=since, workflow=args.workflow)
    if args.workflow and not rows and args.workflow not in _workflows(settings):
        raise CliError(f"unknown workflow {args.workflow!r}: no workflow file and no run of it", code=2)
    built = report.build(rows, until=until, since=since, workflow=args.workflow, per_run=args.per_run)
    if args.json:
        print(built.model_dump_json(indent=2))
        return 0
    from streamagent.console.report import render

    print(render(built))
    return 0


def since_window(text: str) -> Any:
    """``--since``: 30m, 24h, 7d ... or ``all``; a bad value is one argparse line, exit 2."""
    from streamagent.console.report import parse_since

    if text.strip().lower() == "all":
        return None
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- approvals ---------------------------------------------------------------------------------------
def cmd_memory(args: argparse.Namespace) -> int:
    from streamagent.console import memory

    if args.action == "put":
        from streamagent.console.devstack.stack import local_operator

        write = memory.build_write(
            args.entity,
            args.key,
            memory.assignments(args.set or []),
            args.unset or [],
            args.delete,
            args.expect_version,
            args.writer or f"operator:{local_operator()}",
        )
        settings = _settings(("bootstrap_servers", "database_url") if args.wait else ("bootstrap_servers",))
        memory.send(settings, write)
        if not args.wait:
            print(f"{write.ref}: write {write.write_id} sent")
            return 0
        row = memory.wait_for(settings, write, args.timeout)
        print(memory.as_json(row, args.entity, args.key) if args.json else memory.describe(row, args.entity, args.key))
        return 0
    settings = _settings(("database_url",))
    if args.action == "get":
        row = memory.latest(settings, args.entity, args.key)
        if row is None or row["deleted"]:
            gone = " (deleted)" if row is not None else ""
            raise CliError(f"memory has no {args.entity}/{args.key}{gone}")
        print(memory.as_json(row, args.entity, args.key) if args.json else memory.describe(row, args.entity, args.key))
        return 0
    rows = memory.history(settings, args.entity, args.key)
    if not rows:
        raise CliError(f"memory has never held {args.entity}/{args.key}")
    for row in rows:
        print(memory.as_json(row, args.entity, args.key) if args.json else memory.describe(row, args.entity, args.key))
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    from streamagent.processors.projection import queries

    settings = _settings(("database_url",))
    rows = queries.approvals(settings, pending=not args.all, run_id=_run_id(settings, args.run) if args.run else None)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return 0
    if not rows:
        print("no approval pending" if not args.all else "no approval requests")
        return 0
    from datetime import UTC, datetime

    from streamagent.console.tables import approval_line, human_age

    at = datetime.now(UTC)
    print(f"{'RUN':<9} {'STEP':<10} {'TOOL':<8} {'STATUS':<9} {'ASKED':>6} {'EXPIRES':>8}  WHAT, AND WHY")
    for r in rows:
        expires = human_age(r.expires_at - at) if r.status == "requested" else "-"
        print(
            f"{r.run_id[:8]:<9} {r.step:<10} {r.tool:<8} {r.status:<9} {human_age(at - r.requested_at) + ' ago':>6}"
            f" {('in ' + expires) if expires != '-' else '-':>8}  {approval_line(r)}"
        )
    pending = [r for r in rows if r.status == "requested"]
    if pending:
        first = pending[0]
        print(f"\nanswer with: streamagent approve {first.run_id[:8]} {first.step}   (or deny; --note WHY)")
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    """``approve`` / ``deny``: the person's answer, as an event on the run's log (the fold takes it in,
    the guard acts on it). Only a pending request can be answered; answering twice changes nothing."""
    from streamagent.events import ApprovalDenied, ApprovalGranted, stable_id
    from streamagent.processors.projection import queries

    settings = _settings(("bootstrap_servers", "database_url"))
    # Signed with the operator's key: the approver recorded is that key's identity, and an answer that
    # does not verify is refused by the fold (the step stays held).
    signer = _operator(settings, args.by)
    args.run_id = _run_id(settings, args.run_id)
    asked = queries.approvals(settings, pending=False, run_id=args.run_id)
    pending = [r for r in asked if r.step == args.step and r.status == "requested"]
    if not pending:
        if queries.run(settings, args.run_id) is None:
            raise CliError(f"no run {args.run_id}")
        held = sorted({r.step for r in asked if r.status == "requested"})
        answered = [r for r in asked if r.step == args.step]
        if answered:
            last = answered[-1]
            raise CliError(f"the approval of step {args.step} of run {args.run_id} is already {last.status}")
        hint = f"; pending: {', '.join(held)}" if held else ""
        raise CliError(f"run {args.run_id} has no approval pending for step {args.step}{hint}")
    request = pending[-1]
    kind = ApprovalGranted if args.command == "approve" else ApprovalDenied
    event = kind(
        event_id=stable_id(request.request_id, args.command),
        run_id=args.run_id,
        request_id=request.request_id,
        step=args.step,
        by=signer.identity,
        note=args.note or "",
    )
    _write_signed(settings, signer, event, f"the {args.command} of step {args.step}")
    verb = "approved" if args.command == "approve" else "denied"
    print(f"{verb} step {args.step} of run {args.run_id} as {signer.identity} ({request.tool}: {request.reason})")
    return 0


def _by_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--by", type=non_empty, help="optional: the identity of your operator key (the one recorded), checked"
    )


def _operator(settings: Settings, by: str | None) -> RoleKeys:
    """The operator key that signs ``approve``, ``deny`` and ``cancel``; ``--by``, if given, must be its identity."""
    from streamagent.authn import operator_keys

    signer = operator_keys(settings)
    if by is not None and by != signer.identity:
        raise CliError(
            f"--by {by!r}: what you do is recorded under the identity of your operator key, {signer.identity!r}"
            " (another person signs with their own key: STREAMAGENT_OPERATOR_KEYS_FILE)"
        )
    return signer


def _write_signed(settings: Settings, signer: RoleKeys, event: Event, what: str) -> None:
    """``event`` on the run log, keyed by its run, signed with ``signer``; acknowledged, or a one-line error."""
    from streamagent import codec
    from streamagent.kafka import producer as make_producer
    from streamagent.topics import RUN_EVENTS

    producer = make_producer(settings)
    value = codec.encode(event)
    producer.produce(settings.topic(RUN_EVENTS), key=event.run_id.encode(), value=value, headers=signer.headers(value))
    if producer.flush(10):
        raise CliError(f"{what} was not acknowledged by the broker; try again")


def cmd_cancel(args: argparse.Namespace) -> int:
    """``cancel RUN``: an operator stops a running run. The fold marks it, the decision processor ends it
    (status cancelled, "cancelled by NAME: WHY") and its live child runs with it; commands already sent
    finish."""
    from streamagent.events import RunCancelRequested, cancel_event_id
    from streamagent.processors.projection import queries

    settings = _settings(("bootstrap_servers", "database_url"))
    signer = _operator(settings, args.by)
    try:
        run_id = _run_id(settings, args.run_id)
    except CliError as exc:  # unknown, or an ambiguous prefix: a usage error like an ended run
        raise CliError(str(exc), code=2) from None
    row = queries.run(settings, run_id)
    if row is None:
        raise CliError(f"no run {run_id}", code=2)
    if row.status != "running":
        raise CliError(f"run {run_id} has already ended ({row.status}): nothing to cancel", code=2)
    event = RunCancelRequested(event_id=cancel_event_id(run_id), run_id=run_id, by=signer.identity, reason=args.reason)
    _write_signed(settings, signer, event, f"the cancel of run {run_id}")
    print(f"cancel of run {run_id} requested as {signer.identity}: {event.says} (`streamagent show {run_id[:8]}`)")
    return 0


def cmd_keys_issue(args: argparse.Namespace) -> int:
    """``keys issue ROLE``: the role's key file, for a deployment to mount into that one process."""
    from streamagent.authn import issue
    from streamagent.signing import load_keys

    settings = _settings(probe=False)
    try:
        keys = issue(load_keys(settings), args.role)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.out is None:
        print(keys.render(), end="")
        return 0
    keys.write(args.out)
    print(f"wrote the key of {keys.role} to {args.out}")
    return 0


# -- the tool catalogue ------------------------------------------------------------------------------
def cmd_tools(args: argparse.Namespace) -> int:
    from streamagent.catalogue import Catalogue

    with Catalogue(_settings(("bootstrap_servers",))) as catalogue:
        entries = catalogue.load().entries()
    for partition, offset, reason, _detail in catalogue.rejected:  # not in --json: stdout stays a list
        print(f"warning: registry message {partition}:{offset} not readable ({reason}); skipped", file=sys.stderr)
    if args.json:
        print(json.dumps([e.summary() for e in entries], indent=2))
        return 0
    print(f"{'name':<12} {'version':<8} {'status':<12} {'approval':<8} {'members':<30} input schema")
    for e in entries:
        members = ", ".join(m.member_id for m in e.members) or "-"
        print(
            f"{e.name:<12} {e.version:<8} {e.status:<12} {'yes' if e.requires_approval else 'no':<8}"
            f" {members[:30]:<30} {schema_summary(e.input_schema)}"
        )
        if e.refused:
            print(f"{'':<12} refused (another input schema): {', '.join(e.refused)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from streamagent.console.status import render, status

    settings = _settings(("bootstrap_servers",))
    rows = status(settings)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render(rows, settings.topic_prefix))
    return 0


def schema_summary(schema: dict[str, Any]) -> str:
    """``domain: string, employees?: integer``: the input fields, ``?`` marking optional ones."""
    required = set(schema.get("required", ()))
    fields = []
    for name, spec in (schema.get("properties") or {}).items():
        kind = spec.get("type") or ("|".join(s.get("type", "?") for s in spec.get("anyOf", ())) or "?")
        if spec.get("format"):
            kind += f"({spec['format']})"
        fields.append(f"{name}{'' if name in required else '?'}: {kind}")
    return ", ".join(fields) or "(no fields)"


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

    if not args.offset and not args.reason and not args.all:
        raise CliError("choose what to replay with --offset P:O, --reason R or --all", code=2)
    settings = _settings(("bootstrap_servers",))
    letters = read_dead_letters(settings, reason=args.reason)
    if args.offset:
        wanted = set(args.offset)
        letters = [x for x in letters if f"{x.dlq_partition}:{x.dlq_offset}" in wanted]
        unknown = wanted - {f"{x.dlq_partition}:{x.dlq_offset}" for x in letters}
        if unknown:
            raise CliError(f"no dead letter at {', '.join(sorted(unknown))}; `streamagent dlq list` shows them", 2)
    count = replay(settings, letters)
    print(f"replayed {count} dead letter(s) to their source topics")
    return 0


# -- replay ------------------------------------------------------------------------------------------
def _replay_settings() -> tuple[Settings, Any]:
    """The addresses of the running stack; with none running in the data dir and no addresses given, its
    broker and PostgreSQL alone are started (no processor, no tool) for the length of the command: that
    ``Stack`` is returned to be closed (None when nothing was started)."""
    from streamagent.console.devstack.stackfile import discover, running_pid

    found = discover(get_settings())
    if (found.bootstrap_servers and found.database_url) or running_pid(found.data_dir.resolve()) is not None:
        return _settings(("bootstrap_servers", "database_url")), None
    from streamagent.console.devstack.stack import Stack

    print(f"no stack runs in {found.data_dir.resolve()}: starting its broker and PostgreSQL only", file=sys.stderr)
    # No sandbox either: a replay calls no tool (the address is a placeholder nothing listens on). A free
    # port for the broker: a tool started by hand, waiting for `up` at the fixed one, must not join it.
    update = {"sandbox_url": found.sandbox_url or "http://127.0.0.1:9", "broker_port": 0}
    infra = Stack(found.model_copy(update=update), tools=(), processors=()).start()
    return infra.settings, infra


def _timestamp(text: str) -> Any:
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-12-02T10:00:00Z, got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _run_ids(args: argparse.Namespace) -> list[str] | None:
    ids = [r.strip() for chunk in (args.runs or []) for r in chunk.split(",") if r.strip()]
    return ids or None


def cmd_replay(args: argparse.Namespace) -> int:
    from streamagent.console.replay.apply import Refused
    from streamagent.console.replay.command import ReplayOptions, Usage, run_replay
    from streamagent.console.replay.rebuild import Scope

    if args.apply and (args.runs or args.since or args.until):
        raise CliError("--apply rebuilds everything, so it takes a full replay (no --runs, --from or --until)", code=2)
    if args.apply and args.keep:
        raise CliError("--apply moves the rebuilt tables into place; --keep has nothing left to keep", code=2)
    runs = _run_ids(args)
    scope = Scope(runs=frozenset(runs) if runs else None, since=args.since, until=args.until)
    settings, infra = _replay_settings()
    options = ReplayOptions(
        scope,
        apply=args.apply,
        keep=args.keep,
        verify=not args.no_verify,
        json=args.json,
        own_lock=infra is not None,
    )
    try:
        return run_replay(settings, options)
    except Usage as exc:
        raise CliError(str(exc), code=2) from None
    except Refused as exc:
        raise CliError(str(exc), code=1) from None
    finally:
        if infra is not None:
            infra.close()


def cmd_replay_decisions(args: argparse.Namespace) -> int:
    from streamagent.console.replay.command import Usage, run_decisions

    base = get_settings()
    updates: dict[str, object] = {}
    if args.workflows is not None:
        updates["workflows_dir"] = args.workflows
    if args.policies is not None:
        updates["policies_dir"] = args.policies
    if args.decider in ("rules", "llm"):
        updates["decider"] = args.decider
    # A malformed candidate is refused before anything connects.
    _workflows(base.model_copy(update=updates))
    _policy(base.model_copy(update=updates))
    settings, infra = _replay_settings()
    try:
        candidate = settings.model_copy(update=updates)
        return run_decisions(candidate, args.decider, _run_ids(args), args.since, args.max_decisions, args.json)
    except Usage as exc:
        raise CliError(str(exc), code=2) from None
    finally:
        if infra is not None:
            infra.close()


# -- argument checks ---------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def dlq_offset(text: str) -> str:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected PARTITION:OFFSET such as 0:12 (see `dlq list`), got {text!r}")
    return f"{int(match[1])}:{int(match[2])}"


def _replay_scope(p: argparse.ArgumentParser, with_apply: bool = True) -> None:
    p.add_argument("--runs", action="append", metavar="ID[,ID…]", help="only these runs (repeatable)")
    p.add_argument(
        "--from" if with_apply else "--since",
        dest="since",
        type=_timestamp,
        metavar="TIME",
        help="only runs requested (decisions: recorded) at or after TIME, ISO 8601",
    )


class Parser(argparse.ArgumentParser):
    """An argument error is one line (no usage block), exit code 2."""

    def error(self, message: str) -> Any:  # argparse's signature says NoReturn
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# -- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from streamagent.console.devstack.stackfile import discover
    from streamagent.tools import builtin_tools
    from streamagent.tools.sandbox.cli import register as register_sandbox

    parser = Parser(
        prog="streamagent",
        description="A durable, event-driven runtime for AI agents on Kafka. Addresses come from "
        "STREAMAGENT_BOOTSTRAP_SERVERS / STREAMAGENT_DATABASE_URL / STREAMAGENT_SANDBOX_URL; unset, "
        "the embedded broker and PostgreSQL are started (up, demo) or found (other commands).",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log to the terminal too (client libraries included), and print tracebacks of unexpected errors",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    demo = add("demo", cmd_demo, "Start the embedded stack, run onboarding requests end to end, print a summary")
    demo.add_argument("--runs", type=positive_int, default=5, help="how many onboarding requests to submit (default 5)")
    demo.add_argument(
        "--timeout", type=positive_float, default=120.0, help="seconds to wait for every run (default 120)"
    )

    add(
        "up",
        cmd_up,
        "Run the whole embedded stack in the foreground until Ctrl-C, restarting children that die",
    )

    ui = add("ui", cmd_ui, "Serve the run timeline page (read-only): runs, each run's timeline, dead letters")
    ui.add_argument(
        "--port", type=port_number, help="port to listen on (default STREAMAGENT_UI_PORT or 8470; 0: a free one)"
    )
    ui.add_argument("--host", type=non_empty, help="address to listen on (default STREAMAGENT_UI_HOST or 127.0.0.1)")

    submit = add("submit", cmd_submit, "Submit onboarding requests, as an upstream system would")
    submit.add_argument("--company-name", help='quote names with spaces: --company-name "Pied Piper"')
    submit.add_argument("--company-domain", help="e.g. acme.io")
    submit.add_argument("--contact-name")
    submit.add_argument("--contact-email")
    submit.add_argument("--goal", default="onboard new client")
    submit.add_argument("--requested-by")
    submit.add_argument("--run-id", type=non_empty, help="defaults to a new uuid")
    submit.add_argument("--deadline-s", type=positive_float, help="seconds the run may take")
    submit.add_argument("--workflow", type=non_empty, help="workflow to run (default onboarding)")
    submit.add_argument("--file", help="JSON-lines file, one request object per line (fields as the flags)")
    submit.add_argument(
        "--skip-invalid", action="store_true", help="with --file: submit the valid lines, list the others"
    )
    submit.add_argument("--wait", action="store_true", help="wait until every submitted run has ended")
    submit.add_argument("--timeout", type=positive_float, default=120.0, help="seconds --wait waits (default 120)")

    show = add("show", cmd_show, "Print one run's timeline: request, decisions, commands, results")
    show.add_argument("run_id", type=non_empty)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument(
        "--context",
        action="store_true",
        help="under each model decision, the messages the model saw and what it answered (trimmed)",
    )
    show.add_argument("--full", action="store_true", help="with --context: print messages and answers untrimmed")

    runs = add("runs", cmd_runs, "List runs with their status")
    runs.add_argument("--status", choices=["running", "completed", "failed", "escalated", "cancelled"])
    runs.add_argument(
        "--limit", type=positive_int, default=1000, help="the newest this many runs, newest first (default 1000)"
    )
    runs.add_argument("--before", type=non_empty, metavar="RUN", help="the next page: runs requested before RUN")
    runs.add_argument("--json", action="store_true", help="machine-readable output")

    report = add(
        "report",
        cmd_report,
        "Quality report of recent runs: success rate, p50/p95 duration, cost per completed run, tool calls"
        " against the workflow's steps, retries, guard refusals, approvals, top failure reasons",
    )
    report.add_argument(
        "--since",
        type=since_window,
        default=since_window("24h"),
        metavar="WINDOW",
        help="runs requested in this window before now: 30m, 24h, 7d ... or all (default 24h)",
    )
    report.add_argument("--workflow", type=non_empty, help="only runs of this workflow")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.add_argument("--per-run", action="store_true", help="with --json: every run's signals too")

    memory = add("memory", cmd_memory, "Shared memory: put, get and the history of an entity (contact, company, ...)")
    memory_actions = memory.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = memory_actions.add_parser(
        "put",
        help="change an entity, as an upstream system would, and wait for its new version",
        description="Change an entity through intake, as an upstream system would, and wait until the memory"
        " processor has published its new version (or refused the write, saying why).",
    )
    put.add_argument("entity", help="the kind of fact, e.g. contact")
    put.add_argument("key", help="the entity's key, e.g. acme.io")
    put.add_argument("--set", action="append", metavar="FIELD=VALUE", help="set a field (FIELD:=JSON for non-text)")
    put.add_argument("--unset", action="append", metavar="FIELD", help="remove a field")
    put.add_argument("--delete", action="store_true", help="remove the whole entity")
    put.add_argument(
        "--expect-version",
        type=int,
        metavar="N",
        help="refuse the write unless the entity is at version N now (0: it must not exist)",
    )
    put.add_argument("--writer", help="who writes (default operator:<your user name>)")
    put.add_argument("--no-wait", dest="wait", action="store_false", help="send the write and return")
    put.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait (default 30)")
    put.add_argument("--json", action="store_true", help="print the new version as JSON")
    for name, help_ in (("get", "the entity as it is now"), ("history", "every version of the entity, oldest first")):
        reader = memory_actions.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        reader.add_argument("entity", help="the kind of fact, e.g. contact")
        reader.add_argument("key", help="the entity's key, e.g. acme.io")
        reader.add_argument("--json", action="store_true", help="JSON: one object per version printed")
    approvals = add("approvals", cmd_approvals, "List approval requests the guard holds runs for")
    approvals.add_argument("--all", action="store_true", help="answered and expired requests too")
    approvals.add_argument("--run", type=non_empty, help="only this run's requests")
    approvals.add_argument("--json", action="store_true", help="machine-readable output")
    for verb, help_ in (
        ("approve", "Approve a held step: the guard lets its command through, with an approval token"),
        ("deny", "Deny a held step: it fails, and the run undoes what it did"),
    ):
        answer = add(verb, cmd_answer, help_)
        answer.add_argument("run_id", type=non_empty, metavar="RUN")
        answer.add_argument("step", type=non_empty, metavar="STEP")
        _by_option(answer)
        answer.add_argument("--note", default="", help="why (recorded in the run's log)")

    cancel = add("cancel", cmd_cancel, "Cancel a running run (and its child runs): signed with your operator key")
    cancel.add_argument("run_id", type=non_empty, metavar="RUN")
    cancel.add_argument("--reason", default="", help="why (recorded in the run's log and its reason)")
    _by_option(cancel)

    topics = add("topics", lambda a: 2, "Manage the runtime's topics")
    topics_sub = topics.add_subparsers(dest="topics_command", metavar="SUBCOMMAND", required=True)
    create = topics_sub.add_parser(
        "create",
        help="Create the runtime's topics and the stack tools' command topics (idempotent)",
        description="Create the runtime's topics and the command topics of the tools the stack runs"
        " (STREAMAGENT_STACK_TOOLS); existing ones are left alone",
    )
    create.add_argument("--partitions", type=positive_int, help="partition count (default STREAMAGENT_PARTITIONS or 4)")
    create.set_defaults(func=cmd_topics_create)

    processor = add("processor", cmd_processor, "Run one processor in the foreground")
    processor.add_argument("name", choices=["intake", "memory", "state", "decision", "projection"])

    tool = add("tool", cmd_tool, "Run one tool (its own consumer group) in the foreground")
    # Any tool the tools package provides: a new tool deploys without editing a list here. `mcp` runs
    # an MCP server's tools instead (each its own consumer group), named by --server.
    tool.add_argument("name", choices=sorted({*builtin_tools(), MCP}))
    tool.add_argument("--server", help=f"with `{MCP}`: the MCP server (of STREAMAGENT_MCP_CONFIG) whose tools to run")
    tool.add_argument(
        "--tool", action="append", metavar="NAME", help=f"with `{MCP}`: run only this exposed tool (repeatable)"
    )

    status = add(
        "status",
        cmd_status,
        "Every consumer group's members: the partitions each owns, its lag and its work (from the members topic)",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    tools = add("tools", cmd_tools, "List the tool catalogue: name, version, status, members, approval, schema")
    tools.add_argument("--json", action="store_true", help="machine-readable output (full JSON schemas)")

    from streamagent.console.new import add_parser as add_new

    add_new(sub)  # `new tool NAME`: a team's own tool package, outside this repository

    keys = add("keys", lambda a: 2, "Issue role keys: intake's, a tool's, an operator's")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    keys_issue = keys_sub.add_parser(
        "issue",
        help="Write the key of one role (derived from the command keys; it signs as that role only)",
        description="Write the key of ROLE (intake, tool:NAME or operator:IDENTITY), derived from the command"
        " keys, to a file (mode 0600) or stdout. Issue again after rotating the command keys.",
    )
    keys_issue.add_argument("role", type=non_empty, metavar="ROLE")
    keys_issue.add_argument("--out", type=Path, help="file to write (default: print to stdout)")
    keys_issue.set_defaults(func=cmd_keys_issue)

    dlq = add("dlq", lambda a: 2, "Inspect and replay dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="SUBCOMMAND", required=True)
    dlq_list = dlq_sub.add_parser(
        "list",
        help="List dead letters with their reason and source",
        description="List dead letters with their reason and source",
    )
    dlq_list.add_argument("--reason", type=non_empty, help="only this reason")
    dlq_list.add_argument("--json", action="store_true", help="machine-readable output")
    dlq_list.set_defaults(func=cmd_dlq_list)
    dlq_replay = dlq_sub.add_parser(
        "replay",
        help="Put dead letters back on their source topic",
        description="Put chosen dead letters back on their source topic, byte for byte",
    )
    dlq_replay.add_argument("--offset", action="append", type=dlq_offset, help="P:O of a dead letter (repeatable)")
    dlq_replay.add_argument("--reason", type=non_empty, help="every dead letter with this reason")
    dlq_replay.add_argument("--all", action="store_true", help="every dead letter")
    dlq_replay.set_defaults(func=cmd_dlq_replay)

    replay = add(
        "replay",
        cmd_replay,
        "Rebuild the state table, its snapshots and the projection from the topics, beside the live ones, and"
        " verify them against the live ones (never produces anything; safe on a running stack)",
    )
    _replay_scope(replay)
    replay.add_argument("--until", type=_timestamp, metavar="TIME", help="state as it was at TIME (no verification)")
    replay.add_argument("--keep", action="store_true", help="keep the rebuilt projection's schema to query it")
    replay.add_argument("--no-verify", action="store_true", help="rebuild only (e.g. to time it)")
    replay.add_argument(
        "--apply",
        action="store_true",
        help="make the rebuild live: swap in the projection, rewrite the state table's changelog (stack stopped)",
    )
    replay.add_argument("--json", action="store_true", help="also one JSON line with the figures")
    replay_sub = replay.add_subparsers(dest="replay_command", metavar="SUBCOMMAND")
    decisions = replay_sub.add_parser(
        "decisions",
        help="Re-decide recorded snapshots with a candidate decider and diff against what was recorded",
        description="Re-decide recorded snapshots with a candidate decider (rules, llm, or the configured one"
        " with --workflows DIR) and policy (--policies DIR), each with its run's approvals and the tool"
        " catalogue as of that decision, and diff against the recorded decisions. Nothing is produced and no"
        " tool is called; an llm candidate makes real calls to the configured model endpoint.",
    )
    decisions.add_argument("--decider", choices=("configured", "rules", "llm"), default="configured")
    decisions.add_argument(
        "--workflows",
        type=Path,
        metavar="DIR",
        help=f"the candidate's workflow folder(s), several joined by {os.pathsep!r}",
    )
    decisions.add_argument("--policies", type=Path, metavar="DIR", help="the candidate's policy files")
    decisions.add_argument(
        "--max-decisions", type=positive_int, metavar="N", help="re-decide at most N snapshots (caps model calls)"
    )
    decisions.add_argument("--json", action="store_true", help="also one JSON line with the counts and differences")
    _replay_scope(decisions, with_apply=False)
    decisions.set_defaults(func=cmd_replay_decisions)

    workflows = add("workflows", lambda a: 2, "Inspect the workflows (files under workflows_dir)")
    workflows_sub = workflows.add_subparsers(dest="workflows_command", metavar="SUBCOMMAND", required=True)
    check = workflows_sub.add_parser(
        "check",
        help="Load every workflow file; a malformed one is named with its field and reason",
        description="Load every workflow file; a malformed one is named with its field and reason (exit 2)",
    )
    check.set_defaults(func=cmd_workflows_check)

    policies = add("policies", lambda a: 2, "Inspect the policy in force (files under policies_dir)")
    policies_sub = policies.add_subparsers(dest="policies_command", metavar="SUBCOMMAND", required=True)
    policies_check = policies_sub.add_parser(
        "check",
        help="Load every policy file and print the policy: version, files, budgets, rules, rate limits",
        description="Load every policy file (*.toml of policies_dir) and print the policy they make; a"
        " malformed one is named with its field and reason (exit 2)",
    )
    policies_check.set_defaults(func=cmd_policies_check)

    register_sandbox(sub, running_stack_url=lambda settings: discover(settings).sandbox_url or "")
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    for child in _subparsers(parser):
        # `streamagent runs --verbose` as well as `streamagent --verbose runs`; SUPPRESS keeps a
        # subcommand from resetting a flag given before it.
        child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _log_file(args: argparse.Namespace, settings: Settings) -> tuple[str, Path] | None:
    """Where a command logs; None for the children of ``up`` (their stderr is their log file)."""
    # `new` writes files where the user is: no .streamagent/ log folder beside them.
    if args.command in ("processor", "tool", "new") or (args.command == "sandbox" and not args.sandbox_command):
        return None
    name = args.command if args.command in ("up", "demo", "ui") else "cli"
    return name, settings.data_dir / "logs" / f"{name}.log"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # a bad argument exits 2 with one line
    verbose = bool(getattr(args, "verbose", False))
    words = [args.command, *(getattr(args, f"{args.command}_command", None) or "",)]
    prog = " ".join(["streamagent", *filter(None, words)])
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    target = _log_file(args, settings)
    log_path = (
        logs.configure_file(target[0], target[1], settings.log_level, settings.log_format, verbose) if target else None
    )
    if args.command == "new" and not verbose:  # no log file, and its errors are the one line printed below
        logging.getLogger().addHandler(logging.NullHandler())
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place that turns any failure into one line
        message, code, expected = _describe(exc)
        log.error("%s failed: %s", prog, exc, exc_info=not expected)  # all of it, a log tail included
        if verbose and not expected:
            traceback.print_exc()
        where = f"details in {log_path}" if log_path else "details in its log"
        if not expected:
            message += f" ({where}{'' if verbose else '; --verbose prints the traceback'})"
        elif "\n" in str(exc).strip():
            message = f"{message.rstrip(' :;')} ({where})"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code


def _describe(exc: Exception) -> tuple[str, int, bool]:
    """(one line, exit code, whether the failure is an expected kind that needs no traceback)."""
    if isinstance(exc, CliError):
        return str(exc), exc.code, True
    if isinstance(exc, SettingsError):
        return str(exc), 2, True
    from streamagent.processors.workflow import WorkflowError

    if isinstance(exc, WorkflowError):  # e.g. a processor reading a malformed workflow at start
        return f"invalid workflow: {exc}", 2, True
    from streamagent.policy import PolicyError

    if isinstance(exc, PolicyError):  # a malformed policy file, at start
        return f"invalid policy: {exc}", 2, True
    import psycopg  # only now: a command that failed early need not pay for these imports
    from confluent_kafka import KafkaException

    from streamagent.console.devstack.embedded import EmbeddedStartError
    from streamagent.console.devstack.stack import PortInUse, StackRunning, StackStartError

    if isinstance(exc, PortInUse):  # a setting to change, like an invalid one
        return str(exc), 2, True
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"[;,:]?\s*log tail:?\s*$", "", first)  # the tail itself goes to the log file
    if isinstance(exc, StackRunning | StackStartError | EmbeddedStartError):
        return first, 1, True
    if isinstance(exc, psycopg.OperationalError):
        return f"PostgreSQL: {first}", 1, True
    if isinstance(exc, KafkaException):
        error = exc.args[0] if exc.args else None
        return f"Kafka: {error.str() if hasattr(error, 'str') else first}", 1, True
    return f"{type(exc).__name__}: {first}", 1, False


if __name__ == "__main__":
    sys.exit(main())
