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

import json
import ssl as ssl_
import urllib.request
from functools import cache
from typing import Any

import aiohttp
import httpx

# Request headers aiohttp writes itself: the body's length, and the encodings it can decode (httpx would
# offer those it can, which need not be the same).
_AIOHTTP_SETS = frozenset({"content-length", "accept-encoding", "connection"})
_DECODED = (b"content-encoding", b"content-length", b"transfer-encoding")


def _timeout(timeouts: dict[str, Any]) -> aiohttp.ClientTimeout:
    """httpx's timeouts (``Timeout.as_dict()``, or a request's ``timeout`` extension) as aiohttp's."""
    return aiohttp.ClientTimeout(
        total=None,
        connect=timeouts.get("pool"),
        sock_connect=timeouts.get("connect"),
        sock_read=timeouts.get("read"),
    )


@cache
def _proxy(scheme: str, host: str) -> str | None:
    """The proxy the environment names for ``host`` (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), as httpx honours it."""
    proxies = urllib.request.getproxies_environment()
    if "no" in proxies and urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return proxies.get(scheme) or proxies.get("all")


def _json_body(value: Any) -> bytes:
    # As httpx 0.28 encodes ``json=``.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# What ``send`` (the SDK's direct path) takes; any other keyword goes through httpx's client.
DIRECT_KWARGS = frozenset({"json", "params", "content"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport over one aiohttp session (a keep-alive pool of ``max_connections``)."""

    def __init__(self, max_connections: int, ssl: ssl_.SSLContext | None = None, keepalive_s: float = 5.0) -> None:
        self.max_connections = max_connections
        self.ssl = ssl  # the CA bundle httpx would use (certifi), not the system's
        self.keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._timeout_of: dict[int, tuple[httpx.Timeout, aiohttp.ClientTimeout]] = {}

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop that runs the tool (aiohttp binds to it).
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, keepalive_timeout=self.keepalive_s, ssl=self.ssl or True
            )
            # No cookies kept between calls. Proxies from the environment as httpx takes them (``_proxy``),
            # looked up once per host: aiohttp's trust_env does it on a thread for every request.
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in _AIOHTTP_SETS]
        content = await request.aread()
        timeout = _timeout(request.extensions.get("timeout") or {})
        return await self._exchange(request, str(request.url), headers, content or None, timeout)

    async def send(
        self, http: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], **kwargs: Any
    ) -> httpx.Response:
        """``http.request(method, path, headers=headers, **kwargs)`` without httpx's client on the way: the
        SDK's path for ``ctx.request`` (``json``, ``params`` and ``content`` only, see ``DIRECT_KWARGS``).

        httpx's client builds and parses its request, merges URLs and extracts cookies at about three
        times the CPU of the exchange itself (bench/http_client.py). Here the URL is the client's base URL
        joined to ``path`` as httpx joins them, the headers are the client's defaults under ``headers``,
        the timeouts the client's, and the answer is the same ``httpx.Response`` (its ``request`` names the
        method and URL). The SDK's clients keep no cookies between calls through this path.
        """
        url = path if "://" in path else f"{str(http.base_url).rstrip('/')}/{path.lstrip('/')}"
        sent = {k: v for k, v in http.headers.items() if k.lower() not in _AIOHTTP_SETS}
        sent.update(headers)
        content = kwargs.get("content")
        if kwargs.get("json") is not None:
            content = _json_body(kwargs["json"])
            sent["Content-Type"] = "application/json"
        params = kwargs.get("params")
        request = httpx.Request(method, url, params=params)
        return await self._exchange(request, str(request.url), list(sent.items()), content, self._timeouts(http))

    def _timeouts(self, http: httpx.AsyncClient) -> aiohttp.ClientTimeout:
        cached = self._timeout_of.get(id(http))
        if cached is None or cached[0] is not http.timeout:
            cached = self._timeout_of[id(http)] = (http.timeout, _timeout(http.timeout.as_dict()))
        return cached[1]

    async def _exchange(
        self,
        request: httpx.Request,
        url: str,
        headers: list[tuple[str, str]],
        content: bytes | None,
        timeout: aiohttp.ClientTimeout,
    ) -> httpx.Response:
        session = self._open()
        try:
            async with session.request(
                request.method,
                url,
                headers=headers,
                data=content,
                allow_redirects=False,
                timeout=timeout,
                proxy=_proxy(request.url.scheme, request.url.host),
            ) as answer:
                data = await answer.read()
                raw = answer.raw_headers
                status = answer.status
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"{request.method} {url} timed out", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(f"{request.method} {url} failed: {exc!r}", request=request) from exc
        # aiohttp has decoded the body already (gzip, chunked): its length and encoding headers no longer apply.
        decoded = any(k.lower() == b"content-encoding" for k, _ in raw)
        dropped = _DECODED if decoded else (b"transfer-encoding",)
        kept = [(k, v) for k, v in raw if k.lower() not in dropped]
        return httpx.Response(status, headers=kept, content=data, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
