"""A real headless Chromium for tests, driven over the DevTools protocol (no Playwright, no download).

Debian's ``chromium`` package provides the browser (``.ci/run`` installs it). ``chromium()`` finds it,
and fails the test under CI (``CI=true``) rather than skipping it, as the compose check does for
docker-compose. ``Page`` is a minimal synchronous client of one tab: navigate, evaluate JavaScript,
wait until an expression holds, take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

# As root in a container: no sandbox; nothing that talks to the internet (updates, sync, QUIC probes).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)


def chromium() -> str:
    """The Chromium binary; skips the test without one, or fails it under CI."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    message = "chromium is not installed (Debian: apt-get install chromium; .ci/run does it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must test the page in a real browser, but {message}")
    pytest.skip(message)


class Page:
    """One tab of a headless Chromium started for this test, in its own fresh profile."""

    def __init__(self, binary: str, profile: Path, width: int = 1440, height: int = 900) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(profile / "chromium.log").open("wb"),
        )
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            self.loop.run_until_complete(self._connect(width, height))
        except BaseException:
            self.close()
            raise

    async def _connect(self, width: int, height: int) -> None:
        port_file = self.profile / "DevToolsActivePort"  # Chromium writes its chosen port here
        deadline = time.monotonic() + 60  # generous: a loaded CI box starts a browser slowly
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()}): {log}")
            await asyncio.sleep(0.05)  # readiness probe interval
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient() as client:
            targets = (await client.get(f"http://127.0.0.1:{port}/json/list", timeout=30)).json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(url, max_msg_size=0)
        await self._call("Page.enable")
        await self._call("Runtime.enable")
        params = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        await self._call("Emulation.setDeviceMetricsOverride", params)

    async def _call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"DevTools connection ended: {msg.type!r}")
                data = json.loads(msg.data)
                if data.get("id") == call_id:  # everything else is an event we did not ask about
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return dict(data.get("result", {}))

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def goto(self, url: str) -> None:
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"cannot open {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"{expression!r} threw: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; fail with what the page shows at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the page is (re)loading: its context may be gone for a moment
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : '(no body)'")
                raise AssertionError(f"{what or expression} not seen within {timeout}s; the page shows:\n{text}")
            time.sleep(0.1)  # the poll interval of a deadline-bounded wait

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if self._ws is not None:
            self.loop.run_until_complete(self._ws.close())
        if self._session is not None:
            self.loop.run_until_complete(self._session.close())
        self.loop.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
