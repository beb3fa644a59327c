"""The tool SDK's HTTP transport: httpx's client API for tool authors, aiohttp's connection handling below it.

A tool calls ``ctx.request`` and gets an ``httpx.Response``; ``ctx.http`` is an ``httpx.AsyncClient``.
Underneath, httpx's own transport (httpcore) cost most of a tool's CPU: ``bench/http_client.py`` measured
it against aiohttp, whose HTTP parser and connection pool are written in C, for the same keep-alive
POST (docs/benchmarks.md). This transport keeps httpx's client (request building, headers, base URL,
timeouts as configured, the exceptions tools and the SDK catch) and sends the request with aiohttp.

What maps across: httpx's per-request timeouts (connect, read, pool) become aiohttp's; aiohttp's errors
become httpx's (a timeout ``httpx.TimeoutException``, anything else on the way ``httpx.TransportError``),
so ``CallContext.request`` still turns them into retryable errors. No redirects are followed (the SDK
never follows them: an API that moves is a configuration error), and the body is read whole, as tools
read JSON answers.
"""

from __future__ import annotations

import ssl as ssl_
from typing import Any

import aiohttp
import httpx

# Request headers aiohttp writes itself: the body's length, and the encodings it can decode (httpx would
# offer those it can, which need not be the same).
_AIOHTTP_SETS = frozenset({"content-length", "accept-encoding", "connection"})
_DECODED = (b"content-encoding", b"content-length", b"transfer-encoding")


def _timeout(request: httpx.Request) -> aiohttp.ClientTimeout:
    timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
    return aiohttp.ClientTimeout(
        total=None,
        connect=timeouts.get("pool"),
        sock_connect=timeouts.get("connect"),
        sock_read=timeouts.get("read"),
    )


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport over one aiohttp session (a keep-alive pool of ``max_connections``)."""

    def __init__(self, max_connections: int, ssl: ssl_.SSLContext | None = None, keepalive_s: float = 5.0) -> None:
        self.max_connections = max_connections
        self.ssl = ssl  # the CA bundle httpx would use (certifi), not the system's
        self.keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop that runs the tool (aiohttp binds to it).
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, keepalive_timeout=self.keepalive_s, ssl=self.ssl or True
            )
            # As httpx: proxies from the environment (HTTPS_PROXY, ...), no cookies kept between calls.
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=True
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open()
        content = await request.aread()
        try:
            async with session.request(
                request.method,
                str(request.url),
                headers=[(k, v) for k, v in request.headers.multi_items() if k.lower() not in _AIOHTTP_SETS],
                data=content or None,
                allow_redirects=False,
                timeout=_timeout(request),
            ) as answer:
                data = await answer.read()
                headers = [(k, v) for k, v in answer.raw_headers]
                status = answer.status
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"{request.method} {request.url} timed out", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(f"{request.method} {request.url} failed: {exc!r}", request=request) from exc
        # aiohttp has decoded the body already (gzip, chunked): its length and encoding headers no longer apply.
        decoded = any(k.lower() == b"content-encoding" for k, _ in headers)
        dropped = _DECODED if decoded else (b"transfer-encoding",)
        kept = [(k, v) for k, v in headers if k.lower() not in dropped]
        return httpx.Response(status, headers=kept, content=data, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
