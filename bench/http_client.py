"""The tool SDK's HTTP path (issue 24): httpx as the SDK uses it, httpcore directly, and aiohttp, per call.

Each client POSTs the Slack tool's request (``/slack/api/chat.postMessage``, a JSON body, the SDK's
idempotency and run headers) to a sandbox started as its own process, checks the status and parses the
JSON answer, as a tool does. The httpx client is the SDK's own request path: the runner's sharded
clients (``_HttpClients``, keep-alive pools of ``HTTP_SHARD_CONNECTIONS``), ``CallContext.request``
(headers, timeout and transport errors mapped to retryable errors, ``check``) and ``body``. The others get
the same settings: keep-alive pools of the same size, the same timeout, the same headers. Retries are
the runner's (``RetryPolicy``, on ``RetryableError``), above any client, so they cost the same with each.

For each concurrency, the clients take turns (``--rounds`` each, alternating) so machine noise falls on
all of them; the table shows the median round. CPU is this process's (client and event loop), per call;
the sandbox's own CPU is not counted.

    .venv/bin/python bench/http_client.py                       # 3,000 calls, concurrency 1 and 32, 3 rounds
    .venv/bin/python bench/http_client.py --calls 5000 --concurrency 1,8,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpcore
from streamagent.tools.sandbox.client import SandboxClient
from streamagent.tools.sdk import CallContext, RetryableError, body
from streamagent.tools.sdk.runner import _HttpClients

from streamagent.config import Settings

PATH = "/slack/api/chat.postMessage"
MESSAGE = {"channel": "#onboarding", "text": "Welcome Acme Corp (acme.io): project ACME opened, kick-off mail sent."}

Post = Callable[[int], Awaitable[dict[str, Any]]]


@dataclass
class Client:
    """One way of making the call: ``open`` returns the per-call coroutine; ``close`` frees the pool."""

    name: str
    open: Callable[[Settings, int], Awaitable[tuple[Post, Callable[[], Awaitable[None]]]]]


def _headers(i: int) -> dict[str, str]:
    return {"Idempotency-Key": f"bench-{os.getpid()}-{i}", "X-Run-Id": "bench-http"}


def _sdk(httpcore: bool) -> Callable[[Settings, int], Awaitable[tuple[Post, Callable[[], Awaitable[None]]]]]:
    """The SDK's own request path: its sharded clients, ``CallContext.request`` and ``body``; below httpx's
    client either httpx's own transport (httpcore, the SDK until issue 24) or aiohttp (tools/sdk/transport.py)."""

    async def open_(settings: Settings, concurrency: int) -> tuple[Post, Callable[[], Awaitable[None]]]:
        return _sdk_path(_HttpClients(settings, concurrency, settings.tool_timeout_s, httpcore=httpcore))

    return open_


def _sdk_path(clients: _HttpClients) -> tuple[Post, Callable[[], Awaitable[None]]]:

    async def post(i: int) -> dict[str, Any]:
        with clients.lease() as http:
            ctx = CallContext(http, "bench-http", f"bench-{os.getpid()}-{i}", 1, direct=clients.direct(http))
            return body(await ctx.request("POST", PATH, json=MESSAGE))

    return post, clients.aclose


async def _httpcore(settings: Settings, concurrency: int) -> tuple[Post, Callable[[], Awaitable[None]]]:
    pool = httpcore.AsyncConnectionPool(max_connections=concurrency, max_keepalive_connections=concurrency)
    url = settings.sandbox_url.rstrip("/") + PATH
    timeout = settings.tool_timeout_s
    extensions = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}

    async def post(i: int) -> dict[str, Any]:
        content = json.dumps(MESSAGE).encode()
        headers = [*_headers(i).items(), ("Content-Type", "application/json"), ("Content-Length", str(len(content)))]
        try:
            response = await pool.request("POST", url, headers=headers, content=content, extensions=extensions)
        except (httpcore.TimeoutException, httpcore.NetworkError) as exc:
            raise RetryableError(f"POST {PATH} failed: {exc!r}") from exc
        if response.status >= 300:
            raise RetryableError(f"POST {PATH} answered {response.status}")
        return json.loads(response.content)

    return post, pool.aclose


async def _aiohttp(settings: Settings, concurrency: int) -> tuple[Post, Callable[[], Awaitable[None]]]:
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=settings.tool_timeout_s)
    session = aiohttp.ClientSession(settings.sandbox_url, connector=connector, timeout=timeout)

    async def post(i: int) -> dict[str, Any]:
        try:
            async with session.post(PATH, json=MESSAGE, headers=_headers(i)) as response:
                if response.status >= 300:
                    raise RetryableError(f"POST {PATH} answered {response.status}")
                return await response.json()  # type: ignore[no-any-return]
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableError(f"POST {PATH} failed: {exc!r}") from exc

    return post, session.close


CLIENTS = [
    Client("SDK/httpcore", _sdk(httpcore=True)),
    Client("SDK/aiohttp", _sdk(httpcore=False)),
    Client("httpcore", _httpcore),
    Client("aiohttp", _aiohttp),
]


@dataclass(frozen=True)
class Round:
    cpu_us: float  # this process's CPU per call
    p50_ms: float
    p99_ms: float
    calls_per_s: float


async def one_round(client: Client, settings: Settings, calls: int, concurrency: int, warmup: int) -> Round:
    post, close = await client.open(settings, concurrency)
    try:
        latencies: list[float] = []

        async def worker(indexes: range) -> None:
            for i in indexes:
                started = time.perf_counter()
                answer = await post(i)
                latencies.append(time.perf_counter() - started)
                if not answer.get("ok"):
                    raise RuntimeError(f"{client.name}: unexpected answer {answer}")

        async def run(n: int, offset: int) -> None:
            await asyncio.gather(*(worker(range(offset + w, offset + n, concurrency)) for w in range(concurrency)))

        await run(warmup, 0)  # connections opened, pools warm
        latencies.clear()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await run(calls, warmup)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await close()
    latencies.sort()
    return Round(
        cpu_us=cpu / calls * 1e6,
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        calls_per_s=calls / wall,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sandbox() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "streamagent.console.cli", "sandbox", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    with SandboxClient(url) as sandbox:
        sandbox.wait_ready(timeout=30)
    return proc, url


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-call CPU and latency of the tool SDK's HTTP clients.")
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per round (default 3000)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed calls before each round (default 300)")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated concurrencies (default 1,32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client, alternating (default 3)")
    args = parser.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: nproc {len(os.sched_getaffinity(0))}, python {platform.python_version()}, load average {load}")
    proc, url = start_sandbox()
    try:
        settings = Settings(sandbox_url=url)
        print(f"sandbox {url}; timeout {settings.tool_timeout_s} s; {args.calls} calls x {args.rounds} rounds")
        print(f"{'client':<14} {'conc':>4} {'CPU µs/call':>12} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9}")
        results: dict[str, object] = {}
        for concurrency in args.concurrencies:
            rounds: dict[str, list[Round]] = {c.name: [] for c in CLIENTS}
            for _ in range(args.rounds):
                for client in CLIENTS:
                    got = asyncio.run(one_round(client, settings, args.calls, concurrency, args.warmup))
                    rounds[client.name].append(got)
            for name, got in rounds.items():
                median = {
                    field: round(statistics.median(getattr(r, field) for r in got), 2)
                    for field in ("cpu_us", "p50_ms", "p99_ms", "calls_per_s")
                }
                print(
                    f"{name:<14} {concurrency:>4} {median['cpu_us']:>12.1f} {median['p50_ms']:>8.2f}"
                    f" {median['p99_ms']:>8.2f} {median['calls_per_s']:>9.0f}"
                )
                results[f"{name}@{concurrency}"] = median
        print(json.dumps(results))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
