"""The sandbox HTTP server: four fake SaaS APIs behind one port, plus a control API under /_sandbox.

``Sandbox`` is the HTTP-free core (routing, faults, idempotency, effects, stats) so its rules live in
one place; ``SandboxServer`` puts it behind a stdlib ThreadingHTTPServer on a background thread and
``serve`` runs it in the foreground for the CLI.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import ValidationError
from streamagent.tools.sandbox.apis import API_NAMES, ApiRequest, ApiResponse, Effect, FakeApi, make_apis
from streamagent.tools.sandbox.faults import (
    FAULT_KINDS,
    FaultDecision,
    FaultSpec,
    FaultState,
    UnknownApiError,
    describe_validation_error,
)

from streamagent.config import get_settings

log = logging.getLogger(__name__)


ADMIN_PREFIX = "/_sandbox"
IDEMPOTENCY_HEADER = "Idempotency-Key"
RUN_ID_HEADER = "X-Run-Id"
REPLAYED_HEADER = "Idempotent-Replayed"


class Headers(Protocol):
    """Case-insensitive header lookup, as http.server's ``email.message.Message`` provides."""

    def get(self, name: str, /) -> Any: ...


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON-serialisable; None sends no body
    headers: dict[str, str] = field(default_factory=dict)
    outcome: str = "-"  # for the request log line: effect, replayed, fault:429, rejected, ...


def _error(status: int, message: str, outcome: str = "rejected") -> Reply:
    return Reply(status, {"error": message}, outcome=outcome)


def _format_seconds(seconds: float) -> str:
    # Retry-After is normally whole seconds; fractions keep tests fast and "1" stays "1".
    return f"{seconds:.3f}".rstrip("0").rstrip(".") or "0"


def _empty_stats() -> dict[str, Any]:
    return {"requests": 0, "effects": 0, "replayed": 0, "faults": dict.fromkeys(FAULT_KINDS, 0)}


def resolve_seed(seed: int | None) -> int:
    """The explicit seed, else the settings' (STREAMAGENT_SANDBOX_SEED, default 0: runs are reproducible)."""
    return seed if seed is not None else get_settings().sandbox_seed


class Sandbox:
    """Everything the sandbox knows, guarded by one lock so effects, stats and faults agree."""

    def __init__(self, faults: Mapping[str, FaultSpec] | None = None, seed: int | None = None) -> None:
        self._lock = threading.RLock()
        # Set on shutdown so injected latency and hangs end at once instead of pinning threads.
        self._stopping = threading.Event()
        self.faults = FaultState(API_NAMES, seed=resolve_seed(seed), lock=self._lock)
        self._apis: dict[str, FakeApi] = make_apis()
        self._effects: list[Effect] = []
        self._replays: dict[tuple[str, str, str], ApiResponse] = {}
        self._stats: dict[str, dict[str, Any]] = {api: _empty_stats() for api in API_NAMES}
        # Requests per (api, run id), faults included: a test can wait until one run's call was refused
        # rather than until the API as a whole saw some number of calls.
        self._run_requests: Counter[tuple[str, str]] = Counter()
        for api, spec in (faults or {}).items():
            self.faults.set(api, spec)

    def close(self) -> None:
        self._stopping.set()

    # --- inspection (also used directly by in-process tests) ----------------------------------

    def effects(self, api: str | None = None, run_id: str | None = None) -> list[Effect]:
        with self._lock:
            return [
                e for e in self._effects if (api is None or e.api == api) and (run_id is None or e.run_id == run_id)
            ]

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {api: {**s, "faults": dict(s["faults"])} for api, s in self._stats.items()}

    def requests(self, api: str, run_id: str) -> int:
        """How many requests ``api`` received for ``run_id``, refused or not."""
        with self._lock:
            return self._run_requests[(api, run_id)]

    def reset(self) -> None:
        with self._lock:
            self._run_requests.clear()
            self._effects.clear()
            self._replays.clear()
            self._stats = {api: _empty_stats() for api in API_NAMES}
            self.faults.clear()
            for api in self._apis.values():
                api.reset()

    # --- request handling ---------------------------------------------------------------------

    def handle(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes,
        base_url: str,
    ) -> Reply:
        """Answer one HTTP request; ``headers`` must look up names case-insensitively."""
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = dict(parse_qsl(parts.query))
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            return self._admin(method, path[len(ADMIN_PREFIX) :], query, body)
        api, _, rest = path.lstrip("/").partition("/")
        if api not in self._apis:
            return _error(404, f"no route for {path}; api prefixes are /{', /'.join(API_NAMES)}")
        return self._api(api, method, "/" + rest, query, headers, body, base_url)

    def _api(
        self,
        api: str,
        method: str,
        path: str,
        query: dict[str, str],
        headers: Headers,
        body: bytes,
        base_url: str,
    ) -> Reply:
        with self._lock:
            self._stats[api]["requests"] += 1
            run_id = headers.get(RUN_ID_HEADER)
            if run_id:
                self._run_requests[(api, run_id)] += 1
            decision = self.faults.decide(api)
            if decision.kind is not None:
                self._stats[api]["faults"][decision.kind] += 1
        if decision.latency_s:
            self._stopping.wait(decision.latency_s)
        if decision.kind is not None:
            return self._fault_reply(decision)

        matched = self._apis[api].match(method, path)
        if matched is None:
            return _error(404, f"{api} has no endpoint {method} {path}")
        op, params = matched
        try:
            parsed = json.loads(body) if body.strip() else None
        except ValueError as exc:
            return _error(400, f"body is not valid JSON: {exc}")
        request = ApiRequest(
            method=method,
            path=path,
            params=params,
            query=query,
            body=parsed,
            idempotency_key=headers.get(IDEMPOTENCY_HEADER) or None,
            base_url=base_url,
        )
        reply = self._perform(api, op, request, headers.get(RUN_ID_HEADER) or None)
        if decision.lose_response and reply.outcome == "effect":
            with self._lock:
                self._stats[api]["faults"]["lost_response"] += 1
            return _error(504, "gateway timeout after the request was performed (injected)", "fault:lost_response")
        return reply

    def _fault_reply(self, decision: FaultDecision) -> Reply:
        outcome = f"fault:{decision.kind}"
        if decision.kind == "hang":
            # Held long enough to outlast the caller's timeout; shutdown cuts it short.
            self._stopping.wait(decision.hang_s)
            return _error(504, "gateway timeout (injected hang)", outcome)
        if decision.kind == "429":
            reply = _error(429, "rate limited (injected)", outcome)
            reply.headers["Retry-After"] = _format_seconds(decision.retry_after_s)
            return reply
        if decision.kind == "down":
            return _error(503, "service unavailable (injected outage)", outcome)
        return _error(503, "service unavailable (injected)", outcome)

    def _perform(self, api: str, op: str, request: ApiRequest, run_id: str | None) -> Reply:
        key = request.idempotency_key
        # The lock spans lookup, API logic and recording, so two concurrent requests with the
        # same key cannot both perform the effect.
        with self._lock:
            stored = self._replays.get((api, op, key)) if key else None
            if stored is not None:
                self._stats[api]["replayed"] += 1
                return Reply(stored.status, stored.body, {REPLAYED_HEADER: "true"}, "replayed")
            response = self._apis[api].handle(op, request)
            if not response.effect:
                return Reply(response.status, response.body, dict(response.headers), "rejected")
            self._record(api, op, request, response, run_id)
            if key:
                self._replays[(api, op, key)] = response
        return Reply(response.status, response.body, dict(response.headers), "effect")

    def _record(self, api: str, op: str, request: ApiRequest, response: ApiResponse, run_id: str | None) -> None:
        if request.body is not None:
            recorded_request: Any = request.body
        else:
            recorded_request = {**request.params, **request.query}
        self._effects.append(
            Effect(
                seq=len(self._effects) + 1,
                api=api,
                op=op,
                status=response.status,
                run_id=run_id,
                idempotency_key=request.idempotency_key,
                request=recorded_request,
                response=response.body,
                at=datetime.now(UTC),
            )
        )
        self._stats[api]["effects"] += 1

    # --- control API --------------------------------------------------------------------------

    def _admin(self, method: str, route: str, query: dict[str, str], body: bytes) -> Reply:
        try:
            return self._admin_route(method, route, query, body)
        except UnknownApiError as exc:
            return _error(404, str(exc))

    def _admin_route(self, method: str, route: str, query: dict[str, str], body: bytes) -> Reply:
        if route == "/health":
            return Reply(200, {"status": "ok"}, outcome="admin") if method == "GET" else _not_allowed()
        if route == "/effects":
            if method != "GET":
                return _not_allowed()
            api = query.get("api") or None
            if api is not None and api not in API_NAMES:
                raise UnknownApiError(api, API_NAMES)
            effects = self.effects(api, query.get("run_id") or None)
            return Reply(200, [e.model_dump(mode="json") for e in effects], outcome="admin")
        if route == "/requests":
            if method != "GET":
                return _not_allowed()
            api, run_id = query.get("api", ""), query.get("run_id", "")
            if api not in API_NAMES:
                raise UnknownApiError(api, API_NAMES)
            if not run_id:
                return _error(400, "requests needs a run_id query parameter")
            return Reply(200, {"api": api, "run_id": run_id, "requests": self.requests(api, run_id)}, outcome="admin")
        if route == "/stats":
            return Reply(200, self.stats(), outcome="admin") if method == "GET" else _not_allowed()
        if route == "/reset":
            if method != "POST":
                return _not_allowed()
            self.reset()
            return Reply(200, {"reset": True}, outcome="admin")
        if route == "/faults":
            return self._faults_all(method)
        if route.startswith("/faults/"):
            return self._faults_one(method, route[len("/faults/") :], body)
        return _error(404, f"no control endpoint {ADMIN_PREFIX}{route}")

    def _faults_all(self, method: str) -> Reply:
        if method == "GET":
            specs = self.faults.all()
            return Reply(200, {api: spec.model_dump() for api, spec in specs.items()}, outcome="admin")
        if method == "DELETE":
            self.faults.clear()
            return Reply(200, {api: FaultSpec().model_dump() for api in API_NAMES}, outcome="admin")
        return _not_allowed()

    def _faults_one(self, method: str, api: str, body: bytes) -> Reply:
        if method == "GET":
            return Reply(200, self.faults.get(api).model_dump(), outcome="admin")
        if method != "PUT":
            return _not_allowed()
        if api not in API_NAMES:
            raise UnknownApiError(api, API_NAMES)
        try:
            spec = FaultSpec.model_validate_json(body or b"{}")
        except ValidationError as exc:
            return _error(400, describe_validation_error(exc))
        self.faults.set(api, spec)
        log.info("sandbox faults for %s set to %s", api, spec.changes() or "healthy")
        return Reply(200, spec.model_dump(), outcome="admin")


def _not_allowed() -> Reply:
    return _error(405, "method not allowed")


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"  # keep-alive, so client pools reuse connections
    timeout = 60  # an idle keep-alive connection must not hold its thread forever
    # Headers and body go out in separate writes; with Nagle on, delayed ACKs add ~40 ms a request.
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        started = time.monotonic()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            reply = _error(400, "invalid Content-Length")
            self.close_connection = True
        else:
            body = self.rfile.read(length) if length else b""
            host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
            reply = self.server.sandbox.handle(self.command, self.path, self.headers, body, f"http://{host}")
        self._send(reply)
        log.debug(
            "sandbox %s %s -> %d %s run=%s key=%s %.1fms",
            self.command,
            self.path,
            reply.status,
            reply.outcome,
            self.headers.get(RUN_ID_HEADER, "-"),
            self.headers.get(IDEMPOTENCY_HEADER, "-"),
            (time.monotonic() - started) * 1000,
        )

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def _send(self, reply: Reply) -> None:
        data = b"" if reply.body is None else json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            if reply.body is not None:
                self.send_header("Content-Type", "application/json")
            if reply.status != 204:
                self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The caller gave up (typically timed out on an injected hang); nothing to answer.
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib writes every request to stderr; _serve logs one DEBUG line instead.
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True  # so server_close() does not wait on handlers stuck in a hang
    # The stdlib default backlog of 5 resets connections when many workers connect at once.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        super().__init__(address, _Handler)


class SandboxServer:
    """The sandbox on a background thread. Port 0 asks the OS for a free port; read ``url`` after start."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Mapping[str, FaultSpec] | None = None,
        seed: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.sandbox = Sandbox(faults=faults, seed=seed)
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SandboxServer:
        if self._httpd is not None:
            raise RuntimeError("sandbox server already started")
        self._httpd = _HttpServer((self.host, self.port), self.sandbox)
        self.port = self._httpd.server_address[1]
        # A short poll interval keeps stop() quick; the cost is a few idle wakeups a second.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"sandbox-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("sandbox listening on %s (seed %d)", self.url, self.sandbox.faults.seed)
        return self

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("sandbox server not started")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        if self._httpd is None:
            return
        self.sandbox.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    faults: Mapping[str, FaultSpec] | None = None,
    seed: int | None = None,
    stop_event: threading.Event | None = None,
) -> None:
    """Run the sandbox in the foreground until SIGINT/SIGTERM (or ``stop_event`` is set)."""
    stop = stop_event or threading.Event()
    server = SandboxServer(host, port, faults=faults, seed=seed).start()
    restore = _on_signals(stop)
    # Printed, not only logged, so scripts can read the URL when logging is off.
    print(f"sandbox listening on {server.url}", flush=True)
    try:
        while not stop.wait(timeout=1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        restore()
        server.stop()
        log.info("sandbox stopped")


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    """Make SIGINT/SIGTERM set ``stop``; returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be installed from the main thread

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            # None means the old handler was not installed from Python; the default is closest.
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    return restore
