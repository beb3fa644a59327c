"""An MCP server's tools as consumer groups, on the real stack, with a real MCP server.

The server is tests/mcp_server.py (the MCP SDK's server, two tools, every call recorded in a file),
run over stdio (a child of the tool process) and over streamable HTTP (a process of its own). Its
tools are deployed with `streamagent tool mcp --server NAME` from the servers file in the data dir,
announced in the catalogue with the JSON Schema the server lists, and used by the workflows in
tests/mcp_workflows: decided by the rules and by the scripted fake model. One stack serves the
module; each test submits runs for companies of its own, and counts effects in the server's record.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from confluent_kafka import Producer
from helpers import ended, eventually
from mcp_server import calls
from streamagent.processors.projection import queries
from streamagent.tools.sandbox.model import FakeModel

from streamagent import codec
from streamagent.catalogue import Catalogue
from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import RunRequested, ToolCommand, now
from streamagent.signing import parse_keys, sign
from streamagent.submit import produce_requests
from streamagent.topics import command_topic

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SERVER = TESTS / "mcp_server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Helpdesk:
    """The stack, the HTTP server process, and the test server's hooks."""

    stack: Stack
    model: FakeModel
    record: Path
    delay_file: Path
    refuse_file: Path
    port: int
    http: subprocess.Popen[bytes] | None = None

    @property
    def settings(self) -> Settings:
        return self.stack.settings

    def start_http(self) -> None:
        argv = [sys.executable, str(SERVER), "--transport", "http", "--port", str(self.port)]
        argv += ["--record", str(self.record), "--delay-file", str(self.delay_file)]
        log = open(self.settings.data_dir / "logs" / "mcp-http-server.log", "ab")  # noqa: SIM115
        self.http = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        eventually(self._listening, timeout=30, interval=0.1, what="the HTTP MCP server listening")

    def stop_http(self) -> None:
        if self.http is not None and self.http.poll() is None:
            self.http.send_signal(signal.SIGTERM)
            try:
                self.http.wait(10)
            except subprocess.TimeoutExpired:
                self.http.kill()
                self.http.wait(5)
        self.http = None

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def tool_status(self, name: str) -> str | None:
        with Catalogue(self.settings) as catalogue:
            entry = catalogue.load().entry(name)
        return entry.status if entry is not None else None


def servers_file(record: Path, delay_file: Path, refuse_file: Path, port: int) -> str:
    hooks = f'"--record", "{record}", "--delay-file", "{delay_file}", "--refuse-file", "{refuse_file}"'
    return f"""
[servers.helpdesk]
command = ["{sys.executable}", "{SERVER}", "--transport", "stdio", {hooks}]

[servers.helpdesk.tools.lookup_customer]
[servers.helpdesk.tools.create_ticket]
timeout_s = 60

[servers.helpdesk_http]
url = "http://127.0.0.1:{port}/mcp"

[servers.helpdesk_http.tools.lookup_customer]
as = "http_lookup_customer"
[servers.helpdesk_http.tools.create_ticket]
as = "http_create_ticket"
timeout_s = 60
"""


@pytest.fixture(scope="module")
def helpdesk(module_settings: Settings) -> Iterator[Helpdesk]:
    data = module_settings.data_dir
    workflows = data.parent / "workflows"
    workflows.mkdir(parents=True)
    for path in [*(TESTS / "mcp_workflows").glob("*.toml"), REPO / "workflows" / "onboarding.toml"]:
        shutil.copy(path, workflows / path.name)
    record, delay_file, refuse_file = data.parent / "calls.jsonl", data.parent / "delay", data.parent / "refuse"
    port = free_port()
    # The servers file at its default place: mcp.toml in the data dir.
    data.mkdir(parents=True, exist_ok=True)
    (data / "mcp.toml").write_text(servers_file(record, delay_file, refuse_file, port), encoding="utf-8")
    with FakeModel() as model:
        s = module_settings.model_copy(
            update={
                "workflows_dir": workflows,
                "openai_base_url": model.url,
                "model": "fake-model",
                "registry_heartbeat_s": 1.0,
                "mcp_probe_s": 0.5,
            }
        )
        (s.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        with Stack(s, tools=()) as stack:
            desk = Helpdesk(stack, model, record, delay_file, refuse_file, port)
            desk.start_http()
            try:
                stack.add_mcp_server("helpdesk")
                stack.add_mcp_server("helpdesk_http")
                for name in ("lookup_customer", "create_ticket", "http_lookup_customer", "http_create_ticket"):
                    eventually(lambda n=name: desk.tool_status(n) == "available", timeout=60, what=f"{name} available")
                yield desk
            finally:
                desk.stop_http()


def requests(workflow: str, count: int) -> list[RunRequested]:
    """Runs for companies no other test uses (the server's record is counted by customer domain)."""
    tag = uuid.uuid4().hex[:6]
    return [
        r.model_copy(update={"workflow": workflow, "company_domain": f"c{i}-{tag}.example.com"})
        for i, r in enumerate(sample_requests(count))
    ]


def effects(desk: Helpdesk, tool: str, domains: list[str]) -> Counter[str]:
    """Calls of ``tool`` the server saw start, per customer domain among ``domains``."""
    key = "customer" if tool == "create_ticket" else "domain"
    return Counter(
        str(c["arguments"][key])
        for c in calls(desk.record, tool)
        if c["arguments"][key] in domains  # type: ignore[index]
    )


def complete(desk: Helpdesk, workflow: str, count: int, timeout: float = 90) -> list[str]:
    """Submit ``count`` runs of ``workflow``, wait until they end, check each completed; their domains."""
    submitted = requests(workflow, count)
    run_ids = produce_requests(desk.settings, submitted)
    rows = eventually(lambda: ended(desk.settings, run_ids), timeout=timeout, what=f"{count} {workflow} runs ended")
    assert Counter(r.status for r in rows) == {"completed": count}, [(r.run_id, r.reason) for r in rows]
    return [r.company_domain for r in submitted]


def test_the_catalogue_carries_the_json_schema_the_server_lists(helpdesk: Helpdesk) -> None:
    with Catalogue(helpdesk.settings) as catalogue:
        entries = {e.name: e for e in catalogue.load().entries()}
    for name in ("create_ticket", "http_create_ticket"):
        entry = entries[name]
        assert entry.status == "available" and entry.description.startswith("Open a support ticket")
        assert entry.input_schema["required"] == ["subject", "customer"]
        assert set(entry.input_schema["properties"]) == {"subject", "customer", "priority", "request_id"}
        assert entry.retry is not None and entry.retry["max_attempts"] == 1  # at most once: no idempotency key
        assert entry.timeout_s == 60
    assert entries["lookup_customer"].input_schema["required"] == ["domain"]


@pytest.mark.parametrize("workflow", ["helpdesk", "helpdesk-http"])
def test_both_tools_used_by_a_workflow_decided_by_the_rules(helpdesk: Helpdesk, workflow: str) -> None:
    domains = complete(helpdesk, workflow, 3)
    assert effects(helpdesk, "lookup_customer", domains) == Counter({d: 1 for d in domains})
    assert effects(helpdesk, "create_ticket", domains) == Counter({d: 1 for d in domains})
    tickets = [c for c in calls(helpdesk.record, "create_ticket", "finished") if c["arguments"]["customer"] in domains]  # type: ignore[index]
    # The step's arguments were built from the lookup's output (the server's answer, a structured result).
    assert {c["arguments"]["subject"].endswith("(standard tier)") for c in tickets} == {True}  # type: ignore[index]


def test_both_tools_used_by_a_workflow_decided_by_the_scripted_model(helpdesk: Helpdesk) -> None:
    before = len(helpdesk.model.requests)
    domains = complete(helpdesk, "helpdesk-model", 2)
    assert effects(helpdesk, "lookup_customer", domains) == Counter({d: 1 for d in domains})
    assert effects(helpdesk, "create_ticket", domains) == Counter({d: 1 for d in domains})
    asked = helpdesk.model.requests[before:]
    assert asked, "the model was never asked"
    # The model was offered the MCP tools with the server's schema as the function's parameters.
    offered = {t["function"]["name"]: t["function"] for r in asked for t in (r.body.get("tools") or [])}
    assert offered["http_create_ticket"]["parameters"]["required"] == ["subject", "customer"]
    assert "domain" in offered["http_lookup_customer"]["parameters"]["properties"]


def test_a_forged_or_undecodable_command_to_an_mcp_tool_is_dead_lettered_and_never_called(helpdesk: Helpdesk) -> None:
    """The MCP tool's commands go through the SDK's signature check and dead-letter path: a command
    signed with a key the pipeline does not hold, and bytes that are no event, reach no server."""
    desk = helpdesk
    s = desk.settings
    domain = f"forged-{uuid.uuid4().hex[:6]}.example.com"
    forged = ToolCommand(
        run_id=f"run-{domain}",
        command_id=f"cmd-{domain}",
        decision_id=f"dec-{domain}",
        tool="create_ticket",
        step="ticket",
        arguments={"subject": "Free money", "customer": domain},
        deadline_at=now() + timedelta(seconds=60),
    )
    stranger = parse_keys("stranger " + "e" * 64, "a key the pipeline does not hold")
    topic = s.topic(command_topic("create_ticket"))
    producer = Producer({"bootstrap.servers": s.bootstrap_servers})
    producer.produce(topic, key=forged.run_id.encode(), value=codec.encode(sign(forged, stranger)))
    producer.produce(topic, key=b"junk", value=b"not an event")
    assert producer.flush(10) == 0

    def letters() -> dict[str, str] | None:
        mine = {d.reason: d.error for d in read_dead_letters(s) if d.processor == "tool.create_ticket"}
        return mine if len(mine) >= 2 else None

    dead = eventually(letters, timeout=60, what="both commands dead-lettered by the MCP tool")
    assert set(dead) == {"unauthenticated", "not-avro"}, dead
    assert effects(desk, "create_ticket", [domain]) == Counter()
    assert desk.stack.children["tool-mcp-helpdesk"].restarts == 0  # one bad message never stops the process


def test_kill_9_mid_call_reports_an_unknown_outcome_and_never_calls_twice(helpdesk: Helpdesk) -> None:
    desk = helpdesk
    desk.delay_file.write_text("20")  # create_ticket now holds each call 20 s before answering
    try:
        submitted = requests("helpdesk-http", 1)
        domain = submitted[0].company_domain
        (run_id,) = produce_requests(desk.settings, submitted)
        eventually(
            lambda: effects(desk, "create_ticket", [domain])[domain] == 1,
            timeout=60,
            what="the call reached the server",
        )
        desk.stack.kill("tool-mcp-helpdesk_http")  # mid-call; the supervisor starts it again
    finally:
        desk.delay_file.unlink()
    (row,) = eventually(lambda: ended(desk.settings, [run_id]), timeout=90, what="the run ended")
    assert row.status == "failed" and row.failed_step == "ticket", (row.status, row.reason)
    assert "unknown-outcome" in (row.reason or ""), row.reason
    # The server saw one call for this run, and the restarted tool did not make another.
    assert effects(desk, "create_ticket", [domain]) == Counter({domain: 1})


def test_http_server_gone_makes_its_tools_unavailable_and_runs_wait_until_it_is_back(helpdesk: Helpdesk) -> None:
    desk = helpdesk
    desk.stop_http()
    try:
        for name in ("http_lookup_customer", "http_create_ticket"):
            eventually(lambda n=name: desk.tool_status(n) == "unavailable", timeout=30, what=f"{name} unavailable")
        assert desk.tool_status("lookup_customer") == "available"  # the other server's tools are not affected
        submitted = requests("helpdesk-http", 2)
        run_ids = produce_requests(desk.settings, submitted)
        waiting = eventually(
            lambda: waiting_for(desk, run_ids, "http_lookup_customer"), timeout=60, what="runs waiting"
        )
        assert len(waiting) == 2
    finally:
        desk.start_http()
    rows = eventually(lambda: ended(desk.settings, run_ids), timeout=90, what="the runs ended once the server is back")
    assert Counter(r.status for r in rows) == {"completed": 2}, [(r.run_id, r.reason) for r in rows]
    domains = [r.company_domain for r in submitted]
    assert effects(desk, "create_ticket", domains) == Counter({d: 1 for d in domains})


def test_stdio_server_gone_makes_its_tools_unavailable_and_runs_wait_until_it_is_back(helpdesk: Helpdesk) -> None:
    desk = helpdesk
    # The stdio server is the tool process's child: kill it and keep it from starting again (the tool
    # process starts it anew on every reconnect) until the test lets it.
    tool_process = psutil.Process(desk.stack.children["tool-mcp-helpdesk"].pid)
    (server,) = [p for p in tool_process.children() if str(SERVER) in p.cmdline()]
    desk.refuse_file.write_text("down")
    try:
        server.kill()
        for name in ("lookup_customer", "create_ticket"):
            eventually(lambda n=name: desk.tool_status(n) == "unavailable", timeout=30, what=f"{name} unavailable")
        submitted = requests("helpdesk", 2)
        run_ids = produce_requests(desk.settings, submitted)
        eventually(lambda: waiting_for(desk, run_ids, "lookup_customer"), timeout=60, what="runs waiting")
    finally:
        desk.refuse_file.unlink()
    rows = eventually(lambda: ended(desk.settings, run_ids), timeout=90, what="the runs ended once the server is back")
    assert Counter(r.status for r in rows) == {"completed": 2}, [(r.run_id, r.reason) for r in rows]
    domains = [r.company_domain for r in submitted]
    assert effects(desk, "create_ticket", domains) == Counter({d: 1 for d in domains})


def waiting_for(desk: Helpdesk, run_ids: list[str], tool: str) -> list[queries.RunRow] | None:
    rows = [r for r in queries.runs(desk.settings) if r.run_id in run_ids]
    ok = len(rows) == len(run_ids) and all(
        r.status == "running" and r.reason == f"waiting for tool {tool}" for r in rows
    )
    return rows if ok else None
