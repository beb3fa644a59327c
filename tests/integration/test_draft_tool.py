"""The welcome email is drafted by a model: the ``draft`` tool (its own consumer group) asks the scripted
fake model (tools/sandbox/model.py, over real HTTP) on the real broker and PostgreSQL. The demo's runs
mail the model's draft; a draft that fails the checks falls back to the workflow's template and says why;
the draft's tokens and cost are the run's (`runs`, `report` and `show` count them); a run whose budget
(the policy's or the workflow's per-run cap) cannot pay for the draft's call gets the template, the model
not asked; its prompt and answer are in the run's timeline and on the run page.

The template path with no model configured is proven on every default stack: test_end_to_end checks its
runs' mails are the template's, with the reason.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import psycopg
import pytest
from helpers import ended, eventually
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import SandboxClient
from streamagent.tools.sandbox.model import DRAFTED_SIGNATURE, Answer, FakeModel

from streamagent.config import DEFAULT_WORKFLOWS_DIR, Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.demo import drafts, drafts_line, sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.console.ui.api import timeline_entry
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

# Workflows like onboarding whose runs may spend 50 model tokens, by a policy budget and by the
# workflow's own per-run cap: the draft's call (its prompt and the longest answer it allows) needs more.
BUDGET_WORKFLOW = "onboarding-capped"
BUDGET_POLICY = f"""
[workflows.{BUDGET_WORKFLOW}.budgets]
max_tokens = 50
"""
CAPPED_WORKFLOW = "onboarding-per-run-cap"


@pytest.fixture(scope="module")
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


@pytest.fixture(scope="module")
def stack(module_settings: Settings, model: FakeModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workflows = tmp_path_factory.mktemp("workflows")
    for path in DEFAULT_WORKFLOWS_DIR.glob("*.toml"):
        shutil.copy(path, workflows)
    onboarding = (DEFAULT_WORKFLOWS_DIR / "onboarding.toml").read_text()
    capped = onboarding.replace('name = "onboarding"', f'name = "{BUDGET_WORKFLOW}"')
    (workflows / f"{BUDGET_WORKFLOW}.toml").write_text(capped)
    per_run = onboarding.replace('name = "onboarding"', f'name = "{CAPPED_WORKFLOW}"\nmax_tokens_per_run = 50')
    (workflows / f"{CAPPED_WORKFLOW}.toml").write_text(per_run)
    policies = tmp_path_factory.mktemp("policies")
    shutil.copy(module_settings.policies_dir / "default.toml", policies)
    (policies / "budget.toml").write_text(BUDGET_POLICY)
    # The rules decide; only the draft tool asks the model (the decision layer still only decides).
    update = {
        "openai_base_url": model.url,
        "model": "fake-writer",
        "model_prices": json.dumps({"fake-writer": {"prompt": 0.5, "completion": 1.5}}),
        "workflows_dir": workflows,
        "policies_dir": policies,
    }
    with Stack(module_settings.model_copy(update=update)) as running:
        yield running


@pytest.fixture
def s(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    for key, value in to_env(stack.settings).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield stack.settings
    get_settings.cache_clear()


def _mails(s: Settings, run_id: str) -> list[dict[str, str]]:
    effects = SandboxClient(s.sandbox_url).effects(api="email", run_id=run_id)
    return [{"subject": e.request["subject"], "body": e.request["content"][0]["value"]} for e in effects]


def _draft_results(s: Settings, run_id: str) -> list[dict[str, object]]:
    with psycopg.connect(s.database_url) as conn:
        rows = conn.execute(
            "SELECT payload FROM run_events WHERE run_id=%s AND type='ToolResult' AND step='draft'", (run_id,)
        ).fetchall()
    return [r[0] for r in rows]


def _json_out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    capsys.readouterr()
    assert cli(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_the_demos_welcome_emails_are_drafted_by_the_model_and_cost_the_run(
    s: Settings, model: FakeModel, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = sample_requests(2, requested_by="draft-test")
    run_ids = produce_requests(s, requests)
    rows = eventually(lambda: ended(s, run_ids), timeout=120, what="the demo's runs ended")
    assert {r.status for r in rows} == {"completed"}, [(r.status, r.reason) for r in rows]

    for request in requests:
        (mail,) = _mails(s, request.run_id)
        # The model's draft, not the template: it names the contact, the company and the Jira key.
        assert DRAFTED_SIGNATURE in mail["body"] and "Welcome aboard!" not in mail["body"]
        assert request.contact_name in mail["body"] and request.company_name in mail["subject"]
        (result,) = _draft_results(s, request.run_id)
        assert result["output"]["drafted_by"] == "model" and result["output"]["fallback_reason"] is None
        assert result["model"] == "fake-writer" and result["prompt_tokens"] > 0 and result["cost_usd"] > 0
        (jira,) = SandboxClient(s.sandbox_url).effects(api="jira", run_id=request.run_id)
        assert jira.request["key"] in mail["body"]
    assert len(model.drafts) >= 2 and model.calls == 0  # the rules decided: the model only drafted
    assert drafts_line(drafts(s, run_ids)) == "welcome emails: 2 drafted by the model"

    # The draft's tokens and cost are the run's, in `runs` and in `report` (the rules' decisions cost nothing).
    listed = {r["run_id"]: r for r in _json_out(capsys, ["runs", "--json"]) if r["run_id"] in run_ids}  # type: ignore[union-attr]
    for request in requests:
        (result,) = _draft_results(s, request.run_id)
        row = listed[request.run_id]
        assert row["prompt_tokens"] == result["prompt_tokens"]
        assert row["completion_tokens"] == result["completion_tokens"]
        assert row["cost_usd"] == pytest.approx(result["cost_usd"])
    report = _json_out(capsys, ["report", "--json"])
    assert report["total"]["prompt_tokens"] >= sum(r["prompt_tokens"] for r in listed.values())  # type: ignore[index]

    # The timeline shows the tool's prompt and the model's answer, like a model decision's context.
    capsys.readouterr()
    assert cli(["show", run_ids[0], "--context"]) == 0
    shown = capsys.readouterr().out
    line = next(x for x in shown.splitlines() if "ToolResult" in x and " draft " in x)
    assert "[asked model fake-writer]" in line and "tokens" in line
    assert "system: You write the welcome email" in shown and "Facts (JSON):" in shown
    assert "answer: {" in shown and DRAFTED_SIGNATURE in shown
    # ... and so does the run page (what its API serves for each timeline entry; the page lays it out as a
    # decision's messages and answer).
    entries = queries.timeline(s, run_ids[0])
    page = [timeline_entry(e, entries[0].occurred_at) for e in entries]
    (entry,) = [e for e in page if e["type"] == "ToolResult" and e["step"] == "draft"]
    assert entry["model"]["messages"][0]["content"].startswith("You write the welcome email")
    assert json.loads(entry["model"]["answers"][0])["body"] == _mails(s, run_ids[0])[0]["body"]
    assert entry["model"]["prompt_tokens"] > 0


def test_a_draft_that_fails_validation_is_replaced_by_the_template_with_the_reason(
    s: Settings, model: FakeModel
) -> None:
    lazy = {"subject": "Welcome!", "body": "Dear [Name],\n\nWelcome aboard, we are glad to have you with us. " * 2}
    model.script_draft(Answer.text(json.dumps(lazy)))
    (request,) = sample_requests(1, requested_by="draft-test")
    run_ids = produce_requests(s, [request])
    (row,) = eventually(lambda: ended(s, run_ids), timeout=120, what="the run ended")
    assert row.status == "completed", row.reason

    (result,) = _draft_results(s, request.run_id)
    output = result["output"]
    assert output["drafted_by"] == "template"
    reason = output["fallback_reason"]
    assert reason.startswith("the model's draft was refused:")
    assert "the Jira key" in reason and f"the contact name {request.contact_name!r} is missing" in reason
    assert "a placeholder is left: '[Name]'" in reason
    # The template went out, and the refused answer was paid for: its tokens count.
    (mail,) = _mails(s, request.run_id)
    assert mail["body"].startswith(f"Hello {request.contact_name},\n\nWelcome aboard!") and "[Name]" not in mail["body"]
    assert mail["subject"] == f"Welcome to streamagent, {request.company_name}"
    assert result["prompt_tokens"] > 0 and result["model_context"]["answer"] == json.dumps(lazy)
    assert result["model_context"]["fallback_reason"] == reason


def _command_budgets(s: Settings, run_id: str) -> list[tuple[object, object]]:
    with psycopg.connect(s.database_url) as conn:
        rows = conn.execute(
            "SELECT payload FROM run_events WHERE run_id=%s AND type='ToolCommand' AND step='draft'", (run_id,)
        ).fetchall()
    return [(r[0].get("budget_tokens"), r[0].get("budget_cost_usd")) for r in rows]


@pytest.mark.parametrize(
    ("workflow", "limit"),
    [(BUDGET_WORKFLOW, "policy budget max_tokens"), (CAPPED_WORKFLOW, "max_tokens_per_run")],
    ids=["policy-budget", "workflow-cap"],
)
def test_a_draft_over_the_runs_token_budget_sends_the_template_without_asking_the_model(
    s: Settings, model: FakeModel, workflow: str, limit: str
) -> None:
    asked = len(model.drafts)
    (request,) = sample_requests(1, requested_by="draft-test")
    request = request.model_copy(update={"workflow": workflow})
    run_ids = produce_requests(s, [request])
    (row,) = eventually(lambda: ended(s, run_ids), timeout=120, what="the capped run ended")

    # The rules decided (no tokens): the draft's command says the run may spend all 50 of its tokens ...
    assert _command_budgets(s, request.run_id) == [(50, None)]
    # ... and its call needs more, so the model was not asked: the template went out, saying why.
    assert len(model.drafts) == asked
    (result,) = _draft_results(s, request.run_id)
    reason = result["output"]["fallback_reason"]
    assert result["output"]["drafted_by"] == "template"
    assert reason.startswith("over the run's model budget: the call needs up to ") and limit in reason
    assert "and the run may spend 50 more" in reason
    assert (result["prompt_tokens"], result["completion_tokens"], result["cost_usd"]) == (0, 0, 0.0)
    # Nothing was spent, so nothing stops the run: it completes with the template's mail.
    assert row.status == "completed", row.reason
    (mail,) = _mails(s, request.run_id)
    assert mail["body"].startswith(f"Hello {request.contact_name},\n\nWelcome aboard!")
    assert row.prompt_tokens + row.completion_tokens == 0
