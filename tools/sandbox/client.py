"""A small sync client for the sandbox's control API (/_sandbox), for tests, the CLI and the demo."""

from __future__ import annotations

import time
from typing import Any

import httpx
from streamagent.tools.sandbox.apis import Effect
from streamagent.tools.sandbox.faults import FaultSpec


class SandboxError(RuntimeError):
    """The sandbox answered a control request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"sandbox answered {status}: {message}")


class SandboxClient:
    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        # Every admin call is idempotent, so a connection refused or reset while connecting (a busy
        # machine, a server just started) is simply tried again.
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=httpx.HTTPTransport(retries=3))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, "/_sandbox" + path, **kwargs)
        if response.is_error:
            raise SandboxError(response.status_code, _error_message(response))
        return response.json() if response.content else None

    def effects(self, api: str | None = None, run_id: str | None = None) -> list[Effect]:
        params = {k: v for k, v in (("api", api), ("run_id", run_id)) if v is not None}
        return [Effect.model_validate(item) for item in self._request("GET", "/effects", params=params)]

    def requests(self, api: str, run_id: str) -> int:
        """How many requests ``api`` received for ``run_id``, injected faults included."""
        return int(self._request("GET", "/requests", params={"api": api, "run_id": run_id})["requests"])

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/stats")

    def set_faults(self, api: str, spec: FaultSpec) -> FaultSpec:
        return FaultSpec.model_validate(self._request("PUT", f"/faults/{api}", json=spec.model_dump()))

    def faults(self) -> dict[str, FaultSpec]:
        return {api: FaultSpec.model_validate(spec) for api, spec in self._request("GET", "/faults").items()}

    def clear_faults(self) -> None:
        self._request("DELETE", "/faults")

    def reset(self) -> None:
        self._request("POST", "/reset")

    def health(self, timeout: float | None = None) -> bool:
        """True when the sandbox answers its health check; never raises for transport errors."""
        try:
            extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
            return self._http.get("/_sandbox/health", **extra).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 10.0, interval: float = 0.05) -> None:
        """Poll /_sandbox/health until it answers 200; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        # Each probe gets at most the time left, so a server that accepts but never answers
        # cannot stretch the wait past the deadline.
        while not self.health(timeout=max(deadline - time.monotonic(), 0.01)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"sandbox at {self.base_url} not ready after {timeout}s")
            time.sleep(min(interval, remaining))


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return response.text
