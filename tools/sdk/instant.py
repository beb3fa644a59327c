"""Instant tools (``STREAMAGENT_TOOLS_INSTANT``): a tool's HTTP calls answered in this process.

For the benchmark only (``bench/load.py --instant-tools``): the loop's own cost per run, without the
sockets, the HTTP parsing and the sandbox process a real API call brings, so it can be set beside
peers whose steps cost nothing. Everything else of a tool stays as it is: ``ctx.request`` builds the
same request through the same httpx client (its headers, the idempotency key, ``check``), the runner
writes the ledger, signs and produces the result. Only the transport is swapped: the request goes to
an in-process :class:`~streamagent.tools.sandbox.server.Sandbox`, the same API model the sandbox
server answers from, so a tool's output looks exactly as with the real sandbox.

Each tool process has its own in-process sandbox: effects are not shared with the sandbox server (it
records no call), and faults set on the server do not apply.
"""

from __future__ import annotations

import json

import httpx
from streamagent.tools.sandbox.server import Sandbox


class InstantTransport(httpx.AsyncBaseTransport):
    """An httpx transport that answers from an in-process sandbox instead of opening a connection."""

    def __init__(self, sandbox: Sandbox | None = None) -> None:
        self.sandbox = sandbox or Sandbox()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        body = await request.aread()
        base_url = f"{url.scheme}://{url.netloc.decode('ascii')}"
        reply = self.sandbox.handle(request.method, url.raw_path.decode("ascii"), request.headers, body, base_url)
        headers = dict(reply.headers)
        content = b""
        if reply.body is not None:
            content = json.dumps(reply.body).encode()
            headers["Content-Type"] = "application/json"
        return httpx.Response(reply.status, headers=headers, content=content, request=request)
