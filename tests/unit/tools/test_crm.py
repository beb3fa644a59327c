"""The fifth tool: crm creates or updates the client's account in the sandbox's CRM API."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from streamagent.tools import builtin_tools
from streamagent.tools.crm import Account, Crm
from streamagent.tools.sandbox import SandboxClient, SandboxServer
from streamagent.tools.sandbox.apis import API_NAMES
from streamagent.tools.sdk import PermanentError
from test_tool_sdk import Sandbox, run_tool

ACCOUNT = "/crm/v1/accounts/acme.io"


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer("127.0.0.1", 0, seed=7) as srv:
        yield srv


def test_the_crm_api_creates_then_updates_one_account_and_replays_an_idempotency_key(server: SandboxServer) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as http, SandboxClient(server.url) as client:
        client.wait_ready(timeout=5)
        created = http.put(ACCOUNT, json={"name": "Acme", "employees": 40}, headers={"Idempotency-Key": "k1"})
        assert created.status_code == 201 and created.json()["created"] is True
        again = http.put(ACCOUNT, json={"name": "Acme", "employees": 40}, headers={"Idempotency-Key": "k1"})
        assert again.json() == created.json()  # replayed: no second effect
        updated = http.put(ACCOUNT, json={"name": "Acme Inc"}, headers={"Idempotency-Key": "k2"})
        assert updated.status_code == 200
        assert updated.json() == {**created.json(), "name": "Acme Inc", "created": False}
        assert [e.status for e in client.effects("crm")] == [201, 200]
        assert http.put(ACCOUNT, json={}).status_code == 400
        assert http.put("/crm/v1/accounts/nodot", json={"name": "x"}).status_code == 400
    assert "crm" in API_NAMES


def test_the_crm_tool_calls_the_api_and_is_a_builtin_tool() -> None:
    assert builtin_tools()["crm"] is Crm
    sandbox = Sandbox()
    out = run_tool(Crm(), {"domain": "acme.io", "name": "Acme", "employees": 40, "industry": "Robotics"}, sandbox)
    assert isinstance(out, Account) and out.created and out.domain == "acme.io" and out.name == "Acme"
    (request,) = sandbox.requests
    assert request.method == "PUT" and request.url.path == ACCOUNT
    assert request.headers["Idempotency-Key"]
    failing = Sandbox(override=lambda r: httpx.Response(400, json={"error": "name is required"}))
    with pytest.raises(PermanentError):
        run_tool(Crm(), {"domain": "acme.io", "name": "Acme"}, failing)
