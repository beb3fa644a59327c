"""What one MCP call costs a tool: the round trip through the client session an MCP tool uses.

The test MCP server (tests/mcp_server.py) runs over stdio (the bench's child) and over streamable
HTTP (its own process on a free loopback port); ``--calls`` sequential ``lookup_customer`` calls go
through ``ServerConnection.call``, the path of every MCP tool's command, after a few warm-up calls.
Prints a table, then one JSON line per transport.

    .venv/bin/python bench/mcp_call.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamagent.tools.mcp.config import ServerConfig
from streamagent.tools.mcp.connection import ServerConnection

SERVER = Path(__file__).resolve().parents[1] / "tests" / "mcp_server.py"
WARM_UP = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(config: ServerConfig, calls: int) -> list[float]:
    connection = ServerConnection("bench", config, probe_s=60, timeout_s=30)
    keeper = asyncio.create_task(connection.run())
    try:
        await asyncio.wait_for(connection.listed.wait(), 60)
        took = []
        for i in range(WARM_UP + calls):
            started = time.perf_counter()
            await connection.call("lookup_customer", {"domain": "acme.io"}, 30)
            if i >= WARM_UP:
                took.append((time.perf_counter() - started) * 1000)
        return took
    finally:
        connection.stop()
        await keeper


def wait_listening(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # readiness probe interval
    raise TimeoutError(f"the HTTP MCP server did not listen on {port} within {timeout_s}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "calls.jsonl"
        stdio = ServerConfig(
            command=[sys.executable, str(SERVER), "--record", str(record)], tools={"lookup_customer": {}}
        )
        port = free_port()
        argv = [sys.executable, str(SERVER), "--transport", "http", "--port", str(port), "--record", str(record)]
        http_server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port)
            http = ServerConfig(url=f"http://127.0.0.1:{port}/mcp", tools={"lookup_customer": {}})
            for transport, config in (("stdio", stdio), ("http", http)):
                took = sorted(asyncio.run(measure(config, args.calls)))
                rows.append(
                    {
                        "bench": "mcp_call",
                        "transport": transport,
                        "calls": len(took),
                        "p50_ms": round(statistics.median(took), 2),
                        "p99_ms": round(took[min(len(took) - 1, int(len(took) * 0.99))], 2),
                        "mean_ms": round(statistics.fmean(took), 2),
                        "load_1m": round(os.getloadavg()[0], 1),
                    }
                )
        finally:
            http_server.terminate()
            http_server.wait(10)
    print(f"{'transport':<10} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'load':>6}")
    for r in rows:
        figures = f"{r['calls']:>6} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['mean_ms']:>8} {r['load_1m']:>6}"
        print(f"{r['transport']:<10} {figures}")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
