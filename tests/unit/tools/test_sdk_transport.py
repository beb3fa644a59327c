"""The SDK's aiohttp transport under httpx's client (tools/sdk/transport.py): what a tool sees is httpx's.

Against the real sandbox on a background thread: a JSON POST with the SDK's headers, the sandbox's
faults as ``ctx.request`` must class them (a 503 and a 429 retryable with its Retry-After, a hang a
timeout, a refused connection a transport error), and a compressed answer read as plain JSON.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from streamagent.tools.sandbox import FaultSpec, SandboxServer
from streamagent.tools.sdk import CallContext, RetryableError, body
from streamagent.tools.sdk.transport import AiohttpTransport

MESSAGE = {"channel": "#onboarding", "text": "hello"}


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


def _call(base_url: str, timeout_s: float = 5.0, path: str = "/slack/api/chat.postMessage", direct: bool = True) -> Any:
    """One ``ctx.request`` as the runner makes it: straight to aiohttp (``direct``), or through httpx's client."""

    async def go() -> Any:
        transport = AiohttpTransport(4)
        async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s), transport=transport) as http:
            ctx = CallContext(http, "run-1", "cmd-1", 1, direct=transport if direct else None)
            response = await ctx.request("POST", path, json=MESSAGE)
            return response, body(response)

    return asyncio.run(go())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-httpx"])
def test_a_post_carries_the_sdk_headers_and_reads_the_json_answer(sandbox: SandboxServer, direct: bool) -> None:
    response, data = _call(sandbox.url, direct=direct)
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert (response.request.method, response.request.url.path) == ("POST", "/slack/api/chat.postMessage")
    assert data["ok"] is True and data["channel"] == "#onboarding"
    [effect] = sandbox.sandbox.effects("slack")
    assert (effect.run_id, effect.idempotency_key, effect.request) == ("run-1", "cmd-1", MESSAGE)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (FaultSpec(fail_next=1), "answered 503"),
        (FaultSpec(rate_429=1.0, retry_after_s=0.5), "rate limited"),
        (FaultSpec(hang_rate=1.0, hang_s=5.0), "timed out"),
    ],
    ids=["503", "429", "hang"],
)
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-httpx"])
def test_faults_are_classed_as_ctx_request_classes_them(
    sandbox: SandboxServer, spec: FaultSpec, message: str, direct: bool
) -> None:
    sandbox.sandbox.faults.set("slack", spec)
    with pytest.raises(RetryableError, match=message) as raised:
        _call(sandbox.url, timeout_s=0.5, direct=direct)
    if spec.rate_429:
        assert raised.value.retry_after == 0.5


def test_a_refused_connection_is_a_retryable_transport_error() -> None:
    with SandboxServer() as server:
        url = server.url
    with pytest.raises(RetryableError, match="failed"):
        _call(url)


class _Gzipped(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        data = gzip.compress(json.dumps({"ok": True, "encoding": self.headers.get("Accept-Encoding")}).encode())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_compressed_answer_reads_as_plain_json() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gzipped)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        response, data = _call(f"http://127.0.0.1:{server.server_address[1]}", path="/x")
        _, again = _call(f"http://127.0.0.1:{server.server_address[1]}", path="/x", direct=False)
    finally:
        server.shutdown()
    assert data["ok"] is True and "gzip" in data["encoding"] and again == data
    assert "content-encoding" not in response.headers


def test_an_enrich_get_sends_its_query_on_the_direct_path(sandbox: SandboxServer) -> None:
    async def go() -> Any:
        transport = AiohttpTransport(2)
        async with httpx.AsyncClient(base_url=sandbox.url, transport=transport) as http:
            ctx = CallContext(http, "run-1", "cmd-2", 1, direct=transport)
            response = await ctx.request("GET", "/enrich/v2/companies/find", params={"domain": "acme-corp.io"})
            return response, body(response)

    response, data = asyncio.run(go())
    assert data["domain"] == "acme-corp.io"
    assert response.request.url.params["domain"] == "acme-corp.io"
