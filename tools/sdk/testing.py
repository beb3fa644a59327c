"""Unit-test a tool without Kafka: call it once with a ``CallContext`` against a fake API.

``FakeApi`` is a tiny HTTP server on loopback that stands in for the team's API as the SaaS sandbox
does for the built-in tools: it answers every request with what the test says, and records every call,
so a test can count effects. Like a real API that honours ``Idempotency-Key``, a repeated key gets the
first answer again and is not counted as a new effect. ``call_tool`` does what the runner does around
one attempt (validate the arguments, build the context, call, validate the output), no more.

    with FakeApi(lambda call: (201, {"id": "T-1"})) as api:
        out = call_tool(MyTool(), {"subject": "hi"}, api.url)
        assert out.id == "T-1" and len(api.effects) == 1
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from pydantic import BaseModel
from streamagent.tools.sdk.errors import PermanentError
from streamagent.tools.sdk.tool import CallContext, Tool

# What a ``FakeApi`` answers: a status and a JSON body, or a body alone (status 200).
Answer = tuple[int, Any] | Mapping[str, Any]


@dataclass(frozen=True)
class ApiCall:
    """One request the fake API received."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    replay: bool = False  # a repeated Idempotency-Key: answered as before, no new effect
    status: int = 200
    response: Any = field(default=None, compare=False)

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")

    @property
    def run_id(self) -> str | None:
        return self.headers.get("x-run-id")


def _echo(call: ApiCall) -> Answer:
    return (200, {"id": uuid.uuid4().hex[:12], **(call.json if isinstance(call.json, dict) else {})})


class FakeApi:
    """A local HTTP API that answers ``answer(call)`` and records calls; a context manager (start/stop)."""

    def __init__(self, answer: Callable[[ApiCall], Answer] = _echo, host: str = "127.0.0.1") -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self._calls: list[ApiCall] = []
        self._answered: dict[str, tuple[int, Any]] = {}
        self._server = ThreadingHTTPServer((host, 0), self._handler())  # port 0: the OS picks a free one
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-api", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def calls(self) -> list[ApiCall]:
        """Every request, replays included, in the order they arrived."""
        with self._lock:
            return list(self._calls)

    @property
    def effects(self) -> list[ApiCall]:
        """The requests that did something: replays of an idempotency key left out."""
        return [c for c in self.calls if not c.replay]

    def start(self) -> FakeApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _respond(self, call: ApiCall) -> tuple[int, Any]:
        key = call.idempotency_key
        with self._lock:
            if key is not None and key in self._answered:
                status, body = self._answered[key]
                self._calls.append(ApiCall(call.method, call.path, call.headers, call.json, True, status, body))
                return status, body
        answer = self._answer(call)
        status, body = answer if isinstance(answer, tuple) else (200, answer)
        with self._lock:
            if key is not None and status < 300:
                self._answered[key] = (status, body)
            self._calls.append(ApiCall(call.method, call.path, call.headers, call.json, False, status, body))
        return status, body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    data = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    data = raw.decode("utf-8", "replace")
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, body = api._respond(ApiCall(self.command, self.path, headers, data))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:  # the test's output stays its own
                pass

        return Handler


async def acall_tool(
    tool: Tool[Any, Any],
    arguments: Mapping[str, Any],
    api_url: str,
    *,
    run_id: str = "run-test",
    command_id: str | None = None,
    attempt: int = 1,
    timeout_s: float = 5.0,
) -> BaseModel:
    """One attempt of ``tool`` with ``arguments`` against ``api_url``, as the runner makes it: the
    arguments validated by the input model (``PermanentError`` if they are not), the output by the output
    model. The tool's ``RetryableError`` / ``PermanentError`` propagate, so a test can assert on them."""
    args = tool.parse(dict(arguments))
    command_id = command_id or f"cmd-{run_id}-{tool.name}"
    async with httpx.AsyncClient(base_url=api_url, timeout=timeout_s) as http:
        ctx = CallContext(http=http, run_id=run_id, command_id=command_id, attempt=attempt)
        out = await tool.call(args, ctx)
    if not isinstance(out, tool.output_model):
        raise PermanentError(f"{tool.name}.call returned {type(out).__name__}, not {tool.output_model.__name__}")
    return out


def call_tool(tool: Tool[Any, Any], arguments: Mapping[str, Any], api_url: str, **kwargs: Any) -> BaseModel:
    """``acall_tool`` for a plain (not async) test."""
    return asyncio.run(acall_tool(tool, arguments, api_url, **kwargs))
