"""The sandbox over real HTTP: a SandboxServer on a free port, driven with httpx and SandboxClient."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from streamagent.tools.sandbox import FaultSpec, SandboxClient, SandboxServer
from streamagent.tools.sandbox.apis import company_profile
from streamagent.tools.sandbox.cli import load_faults, register
from streamagent.tools.sandbox.client import SandboxError

REPO = Path(__file__).resolve().parents[3]
PROJECT = "/jira/rest/api/3/project"
MAIL = "/email/v3/mail/send"
SLACK = "/slack/api/chat.postMessage"
FIND = "/enrich/v2/companies/find"


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer("127.0.0.1", 0, seed=7) as srv:
        yield srv


@pytest.fixture
def client(server: SandboxServer) -> Iterator[SandboxClient]:
    with SandboxClient(server.url) as sandbox:
        sandbox.wait_ready(timeout=5)
        yield sandbox


@pytest.fixture
def http(server: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=5) as session:
        yield session


def headers(key: str | None = None, run: str | None = None) -> dict[str, str]:
    found = {"Idempotency-Key": key, "X-Run-Id": run}
    return {name: value for name, value in found.items() if value is not None}


def create_project(http: httpx.Client, key: str = "ACME", idem: str | None = None, **extra: Any) -> httpx.Response:
    body = {"key": key, "name": "Acme Inc", "description": "d", "leadAccountEmail": "lead@acme.io", **extra}
    return http.post(PROJECT, json=body, headers=headers(idem))


def mail(to: str, subject: str = "Welcome") -> dict[str, Any]:
    return {
        "personalizations": [{"to": [{"email": to}]}],
        "from": {"email": "onboarding@streamagent.dev"},
        "subject": subject,
        "content": [{"type": "text/plain", "value": "hello"}],
    }


# --- the four APIs ----------------------------------------------------------------------------


def test_enrichment_is_deterministic_per_domain(http: httpx.Client) -> None:
    first = http.get(FIND, params={"domain": "acme.io"})
    second = http.get(FIND, params={"domain": "acme.io"})
    assert first.status_code == 200
    assert first.json() == second.json() == company_profile("acme.io")
    body = first.json()
    assert body["name"] == "Acme"
    assert body["domain"] == "acme.io"
    assert set(body) == {"name", "domain", "industry", "employees", "country", "description"}
    assert http.get(FIND, params={"domain": "foo-bar.co.uk"}).json()["name"] == "Foo Bar"


@pytest.mark.parametrize("query", [{}, {"domain": ""}, {"domain": "acme"}, {"domain": "ac me.io"}])
def test_enrichment_rejects_missing_or_invalid_domain(http: httpx.Client, query: dict[str, str]) -> None:
    response = http.get(FIND, params=query)
    assert response.status_code == 400
    assert "error" in response.json()


def test_enrichment_of_invalid_tld_is_a_permanent_404(http: httpx.Client, client: SandboxClient) -> None:
    response = http.get(FIND, params={"domain": "ghost.invalid"})
    assert response.status_code == 404
    assert response.json() == {"error": "company not found"}
    assert client.effects() == []


def test_jira_creates_a_project(http: httpx.Client, server: SandboxServer) -> None:
    response = create_project(http)
    assert response.status_code == 201
    assert response.json() == {"id": "10001", "key": "ACME", "self": f"{server.url}{PROJECT}/10001"}
    assert create_project(http, key="BETA").json()["id"] == "10002"


@pytest.mark.parametrize("key", ["A", "acme", "1ABC", "ABCDEFGHIJK", "AB-C", None])
def test_jira_rejects_bad_keys(http: httpx.Client, key: str | None) -> None:
    response = create_project(http, key=key)  # type: ignore[arg-type]
    assert response.status_code == 400
    assert "key" in response.json()["error"]


def test_jira_requires_a_name(http: httpx.Client) -> None:
    response = http.post(PROJECT, json={"key": "ACME"})
    assert response.status_code == 400
    assert "name" in response.json()["error"]


def test_jira_key_collision_under_another_idempotency_key_is_409(http: httpx.Client, client: SandboxClient) -> None:
    assert create_project(http, idem="run-1").status_code == 201
    assert create_project(http, idem="run-2").status_code == 409
    assert create_project(http, idem=None).status_code == 409
    assert len(client.effects("jira")) == 1


def test_jira_delete_is_a_recorded_compensation(http: httpx.Client, client: SandboxClient) -> None:
    create_project(http, idem="k")
    response = http.delete(f"{PROJECT}/ACME", headers=headers(run="run-9"))
    assert response.status_code == 204
    assert response.content == b""
    assert http.delete(f"{PROJECT}/ACME").status_code == 404
    deleted = client.effects("jira")[-1]
    assert (deleted.op, deleted.status, deleted.run_id) == ("delete", 204, "run-9")
    assert deleted.request == {"key": "ACME"}
    # The key is free again once the project is gone.
    assert create_project(http, idem="other").status_code == 201


def test_email_is_accepted(http: httpx.Client, client: SandboxClient) -> None:
    response = http.post(MAIL, json=mail("jane@acme.io"))
    assert response.status_code == 202
    assert len(response.json()["message_id"]) == 36
    assert client.effects("email")[0].request["subject"] == "Welcome"


@pytest.mark.parametrize("to", ["jane", "jane@", "@acme.io", "jane@acme", ""])
def test_email_rejects_invalid_recipients(http: httpx.Client, to: str) -> None:
    assert http.post(MAIL, json=mail(to)).status_code == 400


def test_email_to_bounce_domain_is_permanently_rejected(http: httpx.Client, client: SandboxClient) -> None:
    response = http.post(MAIL, json=mail("nobody@bounce.invalid"))
    assert response.status_code == 400
    assert response.json() == {"error": "recipient rejected"}
    assert client.effects() == []


def test_slack_posts_with_unique_ts(http: httpx.Client) -> None:
    answers = [http.post(SLACK, json={"channel": "#onboarding", "text": f"hi {i}"}).json() for i in range(5)]
    assert all(a["ok"] and a["channel"] == "#onboarding" for a in answers)
    assert len({a["ts"] for a in answers}) == 5


def test_slack_without_text_is_ok_false_and_no_effect(http: httpx.Client, client: SandboxClient) -> None:
    response = http.post(SLACK, json={"channel": "#onboarding"})
    assert response.status_code == 200
    assert response.json() == {"ok": False, "error": "no_text"}
    assert client.effects() == []


def test_unknown_routes_and_bad_json(http: httpx.Client) -> None:
    assert http.get("/nowhere").status_code == 404
    assert http.get("/jira/rest/api/3/issue").status_code == 404
    bad = http.post(PROJECT, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400


# --- effects and idempotency ------------------------------------------------------------------


def test_effects_record_run_id_key_request_and_response(http: httpx.Client, client: SandboxClient) -> None:
    http.get(FIND, params={"domain": "acme.io"}, headers=headers(run="run-1"))
    http.post(MAIL, json=mail("jane@acme.io"), headers=headers("mail-1", "run-1"))
    http.post(SLACK, json={"channel": "#x", "text": "hi"}, headers=headers(run="run-2"))

    effects = client.effects()
    assert [(e.seq, e.api, e.op) for e in effects] == [
        (1, "enrich", "find"),
        (2, "email", "send"),
        (3, "slack", "post_message"),
    ]
    enrich, email, _ = effects
    assert enrich.request == {"domain": "acme.io"}
    assert enrich.response["name"] == "Acme"
    assert (email.run_id, email.idempotency_key, email.status) == ("run-1", "mail-1", 202)
    assert email.at.tzinfo is not None
    assert [e.api for e in client.effects("slack")] == ["slack"]
    assert [e.seq for e in client.effects(run_id="run-1")] == [1, 2]


def test_repeated_idempotency_key_replays_without_a_new_effect(http: httpx.Client, client: SandboxClient) -> None:
    first = http.post(MAIL, json=mail("jane@acme.io"), headers=headers("k-1"))
    again = http.post(MAIL, json=mail("jane@acme.io"), headers=headers("k-1"))
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert len(client.effects("email")) == 1
    stats = client.stats()["email"]
    assert (stats["requests"], stats["effects"], stats["replayed"]) == (2, 1, 1)


def test_idempotency_is_scoped_to_api_and_operation(http: httpx.Client, client: SandboxClient) -> None:
    assert create_project(http, idem="shared").status_code == 201
    assert http.delete(f"{PROJECT}/ACME", headers=headers("shared")).status_code == 204
    assert http.post(MAIL, json=mail("a@b.io"), headers=headers("shared")).status_code == 202
    assert [e.op for e in client.effects()] == ["create", "delete", "send"]


def test_failed_requests_are_not_stored_for_replay(http: httpx.Client) -> None:
    assert http.post(MAIL, json=mail("bad"), headers=headers("k")).status_code == 400
    retried = http.post(MAIL, json=mail("good@acme.io"), headers=headers("k"))
    assert retried.status_code == 202
    assert "Idempotent-Replayed" not in retried.headers


def test_concurrent_requests_with_one_key_perform_one_effect(server: SandboxServer, client: SandboxClient) -> None:
    workers = 16
    barrier = threading.Barrier(workers)
    results: list[httpx.Response] = []

    def attempt() -> None:
        with httpx.Client(base_url=server.url, timeout=5) as session:
            barrier.wait()
            results.append(create_project(session, idem="same-key"))

    threads = [threading.Thread(target=attempt) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [r.status_code for r in results] == [201] * workers
    assert {r.json()["id"] for r in results} == {"10001"}
    assert len(client.effects("jira")) == 1
    assert client.stats()["jira"]["replayed"] == workers - 1


# --- faults -----------------------------------------------------------------------------------


def test_fail_next_fails_exactly_n_requests(http: httpx.Client, client: SandboxClient) -> None:
    client.set_faults("jira", FaultSpec(fail_next=2))
    codes = [create_project(http, idem="k").status_code for _ in range(3)]
    assert codes == [503, 503, 201]
    assert client.faults()["jira"].fail_next == 0
    assert client.stats()["jira"]["faults"]["fail_next"] == 2
    assert [e.idempotency_key for e in client.effects()] == ["k"]


def test_down_is_an_outage_until_up(http: httpx.Client, client: SandboxClient) -> None:
    client.set_faults("slack", FaultSpec(down=True))
    assert http.post(SLACK, json={"channel": "#x", "text": "a"}).status_code == 503
    assert http.post(MAIL, json=mail("a@b.io")).status_code == 202  # other apis are unaffected
    client.set_faults("slack", FaultSpec())
    assert http.post(SLACK, json={"channel": "#x", "text": "a"}).status_code == 200
    assert client.stats()["slack"]["faults"]["down"] == 1
    assert [e.api for e in client.effects()] == ["email", "slack"]


def test_rate_429_sends_fractional_retry_after(http: httpx.Client, client: SandboxClient) -> None:
    client.set_faults("email", FaultSpec(rate_429=1.0, retry_after_s=0.2))
    response = http.post(MAIL, json=mail("a@b.io"))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "0.2"
    client.set_faults("email", FaultSpec(rate_429=1.0))
    assert http.post(MAIL, json=mail("a@b.io")).headers["Retry-After"] == "1"
    assert client.stats()["email"]["faults"]["429"] == 2
    assert client.effects() == []


def test_error_rate_one_always_fails_and_zero_never(http: httpx.Client, client: SandboxClient) -> None:
    client.set_faults("enrich", FaultSpec(error_rate=1.0))
    assert {http.get(FIND, params={"domain": "a.io"}).status_code for _ in range(5)} == {503}
    client.set_faults("enrich", FaultSpec(error_rate=0.0))
    assert {http.get(FIND, params={"domain": "a.io"}).status_code for _ in range(5)} == {200}
    assert client.stats()["enrich"]["faults"]["5xx"] == 5


def _outcomes(seed: int, spec: FaultSpec, n: int = 30) -> list[int]:
    with SandboxServer(seed=seed) as srv, httpx.Client(base_url=srv.url, timeout=5) as session:
        SandboxClient(srv.url).set_faults("enrich", spec)
        return [session.get(FIND, params={"domain": "a.io"}).status_code for _ in range(n)]


def test_random_faults_are_reproducible_for_a_seed() -> None:
    spec = FaultSpec(error_rate=0.3, rate_429=0.3)
    first = _outcomes(42, spec)
    assert first == _outcomes(42, spec)
    assert set(first) == {200, 429, 503}
    assert first != _outcomes(43, spec)


def test_setting_a_spec_reseeds_that_api(http: httpx.Client, client: SandboxClient) -> None:
    def run() -> list[int]:
        client.set_faults("enrich", FaultSpec(error_rate=0.5))
        return [http.get(FIND, params={"domain": "a.io"}).status_code for _ in range(20)]

    assert run() == run()


def test_latency_delays_the_answer(http: httpx.Client, client: SandboxClient) -> None:
    client.set_faults("slack", FaultSpec(latency_ms=100))
    started = time.monotonic()
    assert http.post(SLACK, json={"channel": "#x", "text": "a"}).status_code == 200
    assert time.monotonic() - started >= 0.1


def test_short_hang_answers_504(http: httpx.Client, client: SandboxClient) -> None:
    client.set_faults("jira", FaultSpec(hang_rate=1.0, hang_s=0.01))
    assert create_project(http).status_code == 504
    assert client.stats()["jira"]["faults"]["hang"] == 1
    assert client.effects() == []


def test_hang_outlasts_the_client_timeout_and_does_not_block_stop() -> None:
    srv = SandboxServer(faults={"jira": FaultSpec(hang_rate=1.0, hang_s=30)}).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=0.2) as session, pytest.raises(httpx.ReadTimeout):
            create_project(session)
        assert SandboxClient(srv.url).stats()["jira"]["faults"]["hang"] == 1
    finally:
        started = time.monotonic()
        srv.stop()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"rate_429": -0.1}, "rate_429"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"fail_next": "many"}, "fail_next"),
        ({"surprise": True}, "surprise"),
        ({"error_rate": 0.6, "rate_429": 0.6}, "rate_429"),
    ],
)
def test_bad_fault_specs_are_400_naming_the_field(http: httpx.Client, body: dict[str, Any], field: str) -> None:
    response = http.put("/_sandbox/faults/jira", json=body)
    assert response.status_code == 400
    assert field in response.json()["error"]


def test_faults_of_an_unknown_api_are_404_naming_the_known_ones(http: httpx.Client) -> None:
    response = http.put("/_sandbox/faults/stripe", json={})
    assert response.status_code == 404
    assert all(api in response.json()["error"] for api in ("enrich", "jira", "email", "slack"))


def test_faults_are_listed_and_cleared(client: SandboxClient) -> None:
    client.set_faults("email", FaultSpec(down=True))
    faults = client.faults()
    assert set(faults) == {"enrich", "jira", "email", "slack", "crm"}
    assert faults["email"].down
    client.clear_faults()
    assert all(spec == FaultSpec() for spec in client.faults().values())


def test_reset_clears_effects_stats_and_faults(http: httpx.Client, client: SandboxClient) -> None:
    create_project(http, idem="k")
    client.set_faults("slack", FaultSpec(down=True))
    client.reset()
    assert client.effects() == []
    assert client.stats()["jira"]["requests"] == 0
    assert client.faults()["slack"] == FaultSpec()
    # Projects and stored replays are gone too: the same request performs again.
    again = create_project(http, idem="k")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers


def test_requests_are_counted_per_run_refused_or_not(http: httpx.Client, client: SandboxClient) -> None:
    def post(key: str, run: str) -> httpx.Response:
        body = {"key": key, "name": "Acme Inc", "description": "d", "leadAccountEmail": "lead@acme.io"}
        return http.post(PROJECT, json=body, headers=headers(key, run))

    client.set_faults("jira", FaultSpec(down=True))
    assert post("AAA", "run-a").status_code >= 500
    client.clear_faults()
    assert post("AAA", "run-a").status_code == 201
    post("BBB", "run-b")
    assert client.requests("jira", "run-a") == 2  # the refused call counts: it is what a retry test waits for
    assert client.requests("jira", "run-b") == 1
    assert client.requests("slack", "run-a") == 0
    with pytest.raises(SandboxError, match="nope"):
        client.requests("nope", "run-a")
    client.reset()
    assert client.requests("jira", "run-a") == 0


def test_health_and_wait_ready_deadline() -> None:
    srv = SandboxServer().start()
    url = srv.url
    assert SandboxClient(url).health()
    srv.stop()
    with pytest.raises(TimeoutError):
        SandboxClient(url).wait_ready(timeout=0.3)


# --- CLI --------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="streamagent")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sandbox", *argv])
    return args.func(args)


def test_cli_effects_table_and_json(
    http: httpx.Client, server: SandboxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    create_project(http, idem="idem-1")
    http.post(SLACK, json={"channel": "#onboarding", "text": "hi"}, headers=headers(run="run-7"))

    assert run_cli("effects", "--url", server.url) == 0
    table = capsys.readouterr().out
    assert "IDEMPOTENCY KEY" in table
    assert "idem-1" in table and "created project ACME" in table
    assert "run-7" in table and "posted to #onboarding" in table

    assert run_cli("effects", "--api", "slack", "--json", "--url", server.url) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["api"], e["run_id"]) for e in listed] == [("slack", "run-7")]


def test_cli_faults_set_merges_show_and_clear(
    server: SandboxServer, client: SandboxClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("faults", "set", "jira", "--fail-next", "2", "--url", server.url) == 0
    assert run_cli("faults", "set", "jira", "--down", "--retry-after", "0.5", "--url", server.url) == 0
    assert client.faults()["jira"] == FaultSpec(fail_next=2, down=True, retry_after_s=0.5)
    assert run_cli("faults", "set", "jira", "--up", "--url", server.url) == 0
    assert client.faults()["jira"] == FaultSpec(fail_next=2, retry_after_s=0.5)
    capsys.readouterr()

    assert run_cli("faults", "show", "--url", server.url) == 0
    shown = capsys.readouterr().out
    assert "fail_next=2" in shown and "email" in shown and "healthy" in shown

    assert run_cli("faults", "clear", "--url", server.url) == 0
    assert client.faults()["jira"] == FaultSpec()


def test_cli_rejects_bad_fault_values(server: SandboxServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("faults", "set", "email", "--error-rate", "2", "--url", server.url) == 2
    assert "error_rate" in capsys.readouterr().err
    assert run_cli("faults", "set", "email", "--url", server.url) == 2


def test_cli_reports_an_unreachable_sandbox(capsys: pytest.CaptureFixture[str]) -> None:
    srv = SandboxServer().start()
    url = srv.url
    srv.stop()
    assert run_cli("effects", "--url", url) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_load_faults_from_env_and_flags() -> None:
    env = json.dumps({"jira": {"down": True}, "email": {"rate_429": 0.5}})
    faults = load_faults(['email={"fail_next": 3}'], env)
    assert faults == {"jira": FaultSpec(down=True), "email": FaultSpec(fail_next=3)}


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["stripe={}"], "", "known apis"),
        (["jira"], "", "API=JSON"),
        (["jira={oops"], "", "not valid JSON"),
        (['jira={"hang_rate": 7}'], "", "hang_rate"),
        ([], "[1]", "JSON object"),
    ],
)
def test_load_faults_errors(flags: list[str], env: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_faults(flags, env)


def test_cli_serve_runs_until_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from streamagent.tools.sandbox.cli import register\n"
        "parser = argparse.ArgumentParser()\n"
        "register(parser.add_subparsers())\n"
        "args = parser.parse_args(sys.argv[1:])\n"
        "sys.exit(args.func(args))\n"
    )
    argv = ["sandbox", "--port", "0", "--fault", 'jira={"down": true}']
    env = {**os.environ, "STREAMAGENT_SANDBOX_FAULTS": '{"slack": {"fail_next": 1}}'}
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server prints its URL
        assert line.startswith("sandbox listening on "), line
        with SandboxClient(line.split()[-1]) as sandbox:
            sandbox.wait_ready(timeout=10)
            faults = sandbox.faults()
        assert faults["jira"].down and faults["slack"].fail_next == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_lost_response_still_performs_the_effect_and_the_key_replays_it(
    http: httpx.Client, client: SandboxClient
) -> None:
    client.set_faults("jira", FaultSpec(lost_response_rate=1.0))
    project = {"key": "LOST1", "name": "Lost", "leadAccountEmail": "a@acme.io"}
    first = http.post("/jira/rest/api/3/project", json=project, headers={"Idempotency-Key": "k-lost"})
    assert first.status_code == 504  # the caller cannot tell that the project exists
    assert [e.request["key"] for e in client.effects(api="jira")] == ["LOST1"]
    client.set_faults("jira", FaultSpec())
    retry = http.post("/jira/rest/api/3/project", json=project, headers={"Idempotency-Key": "k-lost"})
    assert retry.status_code == 201 and retry.headers.get("Idempotent-Replayed") == "true"
    assert len(client.effects(api="jira")) == 1
    assert client.stats()["jira"]["faults"]["lost_response"] == 1


def test_the_sandbox_help_names_every_api_and_every_fault_field(capsys: pytest.CaptureFixture[str]) -> None:
    from streamagent.tools.sandbox.apis import API_NAMES
    from streamagent.tools.sandbox.faults import FaultSpec

    from streamagent.console.cli import main

    with pytest.raises(SystemExit):
        main(["sandbox", "--help"])
    text = capsys.readouterr().out
    assert all(f"/{name}" in text for name in API_NAMES)
    assert all(field in text for field in FaultSpec.model_fields)
