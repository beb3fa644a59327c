"""The ``streamagent sandbox`` command: serve the sandbox, list its effects, change its faults."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

import httpx
from pydantic import ValidationError
from streamagent.tools.sandbox.apis import API_NAMES, Effect
from streamagent.tools.sandbox.client import SandboxClient, SandboxError
from streamagent.tools.sandbox.faults import FaultSpec, describe_validation_error
from streamagent.tools.sandbox.server import serve

from streamagent.config import Settings, get_settings

FAULTS_ENV = "STREAMAGENT_SANDBOX_FAULTS"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
_SUMMARY_WIDTH = 70

# CLI flag -> FaultSpec field, for `faults set`.
_FAULT_FLAGS: tuple[tuple[str, str, type, str, str], ...] = (
    ("--error-rate", "error_rate", float, "F", "share of requests answered 503, 0..1"),
    ("--rate-429", "rate_429", float, "F", "share of requests answered 429, 0..1"),
    ("--retry-after", "retry_after_s", float, "S", "Retry-After seconds of a 429, fractions allowed"),
    ("--latency-ms", "latency_ms", int, "N", "delay added before every answer, in milliseconds"),
    ("--hang-rate", "hang_rate", float, "F", "share of requests that hang, then get 504, 0..1"),
    ("--hang-s", "hang_s", float, "S", "how long a hang lasts; make it exceed the caller's timeout"),
    ("--fail-next", "fail_next", int, "N", "answer the next N requests with 503"),
    ("--lost-response-rate", "lost_response_rate", float, "F", "share of performed requests answered 504, 0..1"),
)

# Made from the APIs and the fault spec themselves, so the help cannot forget one.
_SERVE_DESCRIPTION = f"""\
Without a subcommand, serve the sandbox in the foreground until Ctrl-C or SIGTERM:
one HTTP server imitating the enrichment, Jira, SendGrid-like email, Slack and CRM APIs
(prefixes {", ".join("/" + name for name in API_NAMES)}) that records every effect and injects
faults on demand. The subcommands talk to a running sandbox.
"""

_SERVE_EPILOG = f"""\
fault specs are JSON objects with the fields of FaultSpec:
  {", ".join(FaultSpec.model_fields)}

examples:
  streamagent sandbox --port 8765
  streamagent sandbox --fault 'jira={{"fail_next": 2}}' --fault 'email={{"rate_429": 0.2}}'
  {FAULTS_ENV}='{{"slack": {{"down": true}}}}' streamagent sandbox
  streamagent sandbox effects --api jira
  streamagent sandbox faults set email --rate-429 0.5 --retry-after 0.2
"""


def register(
    subparsers: argparse._SubParsersAction, running_stack_url: Callable[[Settings], str] | None = None
) -> None:
    """Add the ``sandbox`` command (and its subcommands) to the top-level CLI. ``running_stack_url``
    names the sandbox of a stack running under the settings' data dir ("" if none): the composition
    root knows how stacks are found, the sandbox does not."""
    sandbox = subparsers.add_parser(
        "sandbox",
        help="run or inspect the fake SaaS sandbox (enrich, jira, email, slack)",
        description=_SERVE_DESCRIPTION,
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sandbox.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (default: %(default)s)")
    sandbox.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port to bind, 0 picks a free one")
    sandbox.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="API=JSON",
        help=f"initial fault spec of one api (repeatable); overrides that api's entry in ${FAULTS_ENV}",
    )
    sandbox.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the fault dice, for reproducible chaos (default: $STREAMAGENT_SANDBOX_SEED or 0)",
    )
    sandbox.set_defaults(func=cmd_serve, running_stack_url=running_stack_url or (lambda _settings: ""))

    commands = sandbox.add_subparsers(dest="sandbox_command", metavar="COMMAND", title="commands")
    url_option = argparse.ArgumentParser(add_help=False)
    url_option.add_argument(
        "--url",
        default=None,
        type=_http_url,
        help="sandbox base URL (default: $STREAMAGENT_SANDBOX_URL, else the sandbox of the `streamagent up`"
        f" running in the data dir, else {DEFAULT_URL})",
    )
    _register_effects(commands, url_option)
    _register_faults(commands, url_option)


def _register_effects(commands: argparse._SubParsersAction, url_option: argparse.ArgumentParser) -> None:
    effects = commands.add_parser(
        "effects",
        parents=[url_option],
        help="list the effects a running sandbox recorded",
        description=(
            "List every request the sandbox performed successfully (faulted, rejected and "
            "idempotently replayed requests are not effects), oldest first."
        ),
    )
    effects.add_argument("--api", choices=API_NAMES, help="only effects of this api")
    effects.add_argument("--run-id", default=None, help="only effects whose X-Run-Id header had this value")
    effects.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    effects.set_defaults(func=cmd_effects)


def _register_faults(commands: argparse._SubParsersAction, url_option: argparse.ArgumentParser) -> None:
    faults = commands.add_parser(
        "faults",
        help="show or change the faults a running sandbox injects",
        description="Show, set or clear the per-api fault specs of a running sandbox; changes apply at once.",
    )
    actions = faults.add_subparsers(dest="faults_command", metavar="ACTION", title="actions", required=True)

    show = actions.add_parser(
        "show",
        parents=[url_option],
        help="print every api's fault spec",
        description="Print every api's fault spec; `healthy` means no faults.",
    )
    show.add_argument("--json", action="store_true", help="print the full specs as JSON")
    show.set_defaults(func=cmd_faults_show)

    set_ = actions.add_parser(
        "set",
        parents=[url_option],
        help="change some fields of one api's fault spec",
        description=(
            "Change the given fields of one api's fault spec; fields not given keep their current "
            "value (use `faults clear` to start from a healthy api). Setting a rate reseeds that "
            "api's dice, so the same settings give the same outcomes."
        ),
    )
    set_.add_argument("api", choices=API_NAMES, help="the api to change")
    for flag, dest, kind, metavar, text in _FAULT_FLAGS:
        set_.add_argument(flag, dest=dest, type=kind, metavar=metavar, default=None, help=text)
    outage = set_.add_mutually_exclusive_group()
    outage.add_argument(
        "--down",
        dest="down",
        action="store_const",
        const=True,
        default=None,
        help="answer every request with 503 (an outage)",
    )
    outage.add_argument("--up", dest="down", action="store_const", const=False, help="end an outage")
    set_.set_defaults(func=cmd_faults_set)

    clear = actions.add_parser(
        "clear",
        parents=[url_option],
        help="make every api healthy again",
        description="Reset every api's fault spec to healthy. Effects and stats are kept.",
    )
    clear.set_defaults(func=cmd_faults_clear)


# --- serve ------------------------------------------------------------------------------------


def load_faults(flags: Iterable[str], env_value: str = "") -> dict[str, FaultSpec]:
    """Initial faults from ``$STREAMAGENT_SANDBOX_FAULTS`` (a JSON object) and ``--fault API=JSON``.

    Raises ValueError with a message fit for the user.
    """
    raw: dict[str, Any] = {}
    if env_value.strip():
        try:
            env_faults = json.loads(env_value)
        except ValueError as exc:
            raise ValueError(f"{FAULTS_ENV} is not valid JSON: {exc}") from None
        if not isinstance(env_faults, dict):
            raise ValueError(f"{FAULTS_ENV} must be a JSON object {{api: spec}}")
        raw.update(env_faults)
    for flag in flags:
        api, sep, spec_json = flag.partition("=")
        if not sep:
            raise ValueError(f"--fault {flag!r} must look like API=JSON")
        try:
            raw[api.strip()] = json.loads(spec_json)
        except ValueError as exc:
            raise ValueError(f"--fault {api}: not valid JSON: {exc}") from None
    return {api: _parse_spec(api, spec) for api, spec in raw.items()}


def _parse_spec(api: str, spec: Any) -> FaultSpec:
    if api not in API_NAMES:
        raise ValueError(f"unknown api {api!r}; known apis: {', '.join(API_NAMES)}")
    try:
        return FaultSpec.model_validate(spec)
    except ValidationError as exc:
        raise ValueError(f"{api}: {describe_validation_error(exc)}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        faults = load_faults(args.fault, get_settings().sandbox_faults)
    except ValueError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    try:
        serve(args.host, args.port, faults, seed=args.seed)
    except (OSError, ValueError) as exc:  # port in use, bad seed in the environment
        print(f"sandbox: {exc}", file=sys.stderr)
        return 1
    return 0


# --- commands against a running sandbox -------------------------------------------------------


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return value


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) <= len("https://"):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def _url(args: argparse.Namespace) -> tuple[str, str]:
    """The sandbox URL and where it came from."""
    if args.url:
        return args.url, "--url"
    settings = get_settings()
    if settings.sandbox_url:
        return settings.sandbox_url, "STREAMAGENT_SANDBOX_URL"
    found = args.running_stack_url(settings)
    if found:
        return found, f"the stack running in {settings.data_dir.resolve()}"
    return DEFAULT_URL, f"the default; no stack runs in {settings.data_dir.resolve()}"


def _with_client(args: argparse.Namespace, action: Callable[[SandboxClient], int]) -> int:
    url, source = _url(args)
    try:
        with SandboxClient(url) as client:
            return action(client)
    except httpx.TransportError as exc:
        print(
            f"sandbox: cannot reach {url} ({source}): {exc}; start the stack with `streamagent up`"
            " (or a lone sandbox with `streamagent sandbox`), or pass --url",
            file=sys.stderr,
        )
    except SandboxError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
    return 1


def cmd_effects(args: argparse.Namespace) -> int:
    def run(client: SandboxClient) -> int:
        effects = client.effects(api=args.api, run_id=args.run_id)
        if args.json:
            print(json.dumps([e.model_dump(mode="json") for e in effects], indent=2))
        else:
            print(format_effects(effects))
        return 0

    return _with_client(args, run)


def cmd_faults_show(args: argparse.Namespace) -> int:
    def run(client: SandboxClient) -> int:
        faults = client.faults()
        if args.json:
            print(json.dumps({api: spec.model_dump() for api, spec in faults.items()}, indent=2))
            return 0
        width = max(map(len, faults), default=0)
        for api, spec in faults.items():
            changes = " ".join(f"{k}={v}" for k, v in spec.changes().items()) or "healthy"
            print(f"{api:<{width}}  {changes}")
        return 0

    return _with_client(args, run)


def cmd_faults_set(args: argparse.Namespace) -> int:
    fields = [dest for _, dest, *_ in _FAULT_FLAGS] + ["down"]
    updates = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if not updates:
        print("sandbox: give at least one fault option (see --help)", file=sys.stderr)
        return 2
    try:  # bad values are refused before the sandbox is asked anything
        FaultSpec.model_validate(updates)
    except ValidationError as exc:
        print(f"sandbox: {describe_validation_error(exc)}", file=sys.stderr)
        return 2

    def run(client: SandboxClient) -> int:
        current = client.faults()[args.api]
        try:
            spec = FaultSpec.model_validate({**current.model_dump(), **updates})
        except ValidationError as exc:
            print(f"sandbox: {describe_validation_error(exc)}", file=sys.stderr)
            return 2
        applied = client.set_faults(args.api, spec)
        changes = " ".join(f"{k}={v}" for k, v in applied.changes().items()) or "healthy"
        print(f"{args.api}  {changes}")
        return 0

    return _with_client(args, run)


def cmd_faults_clear(args: argparse.Namespace) -> int:
    def run(client: SandboxClient) -> int:
        client.clear_faults()
        print("all apis healthy")
        return 0

    return _with_client(args, run)


# --- output -----------------------------------------------------------------------------------


def summarize(effect: Effect) -> str:
    """One human line per effect, for the effects table."""
    request = effect.request if isinstance(effect.request, dict) else {}
    response = effect.response if isinstance(effect.response, dict) else {}
    match effect.api, effect.op:
        case "enrich", _:
            return f"found {request.get('domain')}: {response.get('name')}"
        case "jira", "create":
            return f"created project {request.get('key')} (id {response.get('id')}) {request.get('name')!r}"
        case "jira", "delete":
            return f"deleted project {request.get('key')}"
        case "email", _:
            return f"mailed {', '.join(_recipients(request))}: {request.get('subject')!r}"
        case "slack", _:
            return f"posted to {request.get('channel')}: {request.get('text')!r}"
    return effect.op


def _recipients(body: dict[str, Any]) -> list[str]:
    return [
        str(to.get("email"))
        for p in body.get("personalizations") or []
        if isinstance(p, dict)
        for to in p.get("to") or []
        if isinstance(to, dict)
    ]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_effects(effects: list[Effect]) -> str:
    if not effects:
        return "no effects"
    header = ("SEQ", "API", "RUN", "IDEMPOTENCY KEY", "SUMMARY")
    rows = [
        (str(e.seq), e.api, e.run_id or "-", e.idempotency_key or "-", _clip(summarize(e), _SUMMARY_WIDTH))
        for e in effects
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)
