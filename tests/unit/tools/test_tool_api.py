"""The tool author's public API: the names of ``streamagent.tools.sdk.__all__``, documented, kept
stable, and the only streamagent names a generated tool package imports. The testing helpers call a
tool once against a fake API, without Kafka."""

from __future__ import annotations

import ast
import asyncio
import re
import tomllib
from pathlib import Path

import pytest
import streamagent.tools.sdk as sdk
from pydantic import BaseModel
from streamagent.tools.sdk import (
    CallContext,
    FakeApi,
    PermanentError,
    RetryableError,
    Tool,
    ToolError,
    acall_tool,
    body,
    call_tool,
)

from streamagent.config import SettingsError, settings_from
from streamagent.console.new import files

ROOT = Path(__file__).resolve().parents[3]
# Removing or renaming one of these breaks every team's tool package: add names, never take one away.
STABLE = {
    "ApiCall",
    "CallContext",
    "FakeApi",
    "PermanentError",
    "RetryPolicy",
    "RetryableError",
    "Tool",
    "ToolError",
    "acall_tool",
    "body",
    "call_tool",
    "check",
}


def test_the_public_names_exist_and_are_all_there_is() -> None:
    assert set(sdk.__all__) == STABLE
    for name in STABLE:
        assert getattr(sdk, name) is not None, name
    assert issubclass(sdk.RetryableError, ToolError) and issubclass(sdk.PermanentError, ToolError)


def test_the_api_page_documents_every_public_name() -> None:
    page = (ROOT / "docs" / "guides" / "tool-api.md").read_text()
    assert [name for name in sorted(STABLE) if f"`{name}" not in page] == []


def _streamagent_imports(source: str) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "streamagent":
            found += [(node.module or "", alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "streamagent"]
    return found


@pytest.mark.parametrize("name", ["tickets", "hr-directory"])
def test_a_generated_package_imports_only_public_names(name: str) -> None:
    written = files(name)
    imports = [i for path, text in written.items() if path.endswith(".py") for i in _streamagent_imports(text)]
    assert imports, "the generated package should use the SDK"
    assert [i for i in imports if i[0] != "streamagent.tools.sdk" or i[1] not in STABLE] == []
    for path, text in written.items():
        if path.endswith(".py"):
            compile(text, path, "exec")  # valid Python
    project = tomllib.loads(written["pyproject.toml"])
    module = name.replace("-", "_") + "_tool"
    cls = "".join(p.capitalize() for p in name.split("-"))
    assert project["project"]["entry-points"]["streamagent.tools"] == {name: f"{module}.tool:{cls}"}
    assert "streamagent" in project["project"]["dependencies"]
    assert tomllib.loads(written[f"workflows/{name}-example.toml"])["tools"] == [name]


# -- the testing helpers ----------------------------------------------------------------------------
class Note(BaseModel):
    text: str


class Saved(BaseModel):
    id: str


class Notes(Tool[Note, Saved]):
    name = "notes"
    description = "Save a note"
    input_model = Note
    output_model = Saved

    async def call(self, args: Note, ctx: CallContext) -> Saved:
        return Saved.model_validate(body(await ctx.request("POST", "/notes", json=args.model_dump())))


def test_call_tool_calls_the_fake_api_once_per_command_and_a_repeat_is_a_replay() -> None:
    answers = iter(["n-1", "n-2"])
    with FakeApi(lambda call: (201, {"id": next(answers)})) as api:
        first = call_tool(Notes(), {"text": "a"}, api.url, run_id="r1", command_id="c1")
        again = call_tool(Notes(), {"text": "a"}, api.url, run_id="r1", command_id="c1")
        other = call_tool(Notes(), {"text": "b"}, api.url, run_id="r2", command_id="c2")
    assert (first.id, again.id, other.id) == ("n-1", "n-1", "n-2")
    assert [(c.json, c.replay, c.idempotency_key, c.run_id) for c in api.calls] == [
        ({"text": "a"}, False, "c1", "r1"),
        ({"text": "a"}, True, "c1", "r1"),
        ({"text": "b"}, False, "c2", "r2"),
    ]
    assert len(api.effects) == 2


def test_call_tool_raises_what_the_runner_would_act_on() -> None:
    with FakeApi(lambda call: (429, {"error": "slow down"})) as api:
        with pytest.raises(RetryableError, match="rate limited"):
            call_tool(Notes(), {"text": "a"}, api.url)
        with pytest.raises(PermanentError, match="invalid arguments for notes"):
            call_tool(Notes(), {"txt": "a"}, api.url)
    assert len(api.calls) == 1  # the invalid arguments never reached the API
    with pytest.raises(RetryableError, match="failed"):
        call_tool(Notes(), {"text": "a"}, api.url)  # stopped: connection refused


def test_acall_tool_checks_the_output_model() -> None:
    class Sloppy(Notes):
        async def call(self, args: Note, ctx: CallContext) -> Saved:
            return {"id": "x"}  # type: ignore[return-value]

    with FakeApi() as api, pytest.raises(PermanentError, match="returned dict, not Saved"):
        asyncio.run(acall_tool(Sloppy(), {"text": "a"}, api.url))


def test_the_default_fake_api_echoes_the_body_with_an_id() -> None:
    with FakeApi() as api:
        out = call_tool(Notes(), {"text": "hello"}, api.url)
    assert re.fullmatch(r"[0-9a-f]{12}", out.id) and api.calls[0].response["text"] == "hello"


# -- a tool's own API: tool_urls ---------------------------------------------------------------------
def test_tool_urls_send_a_tool_to_its_own_api_and_the_others_to_the_sandbox() -> None:
    s = settings_from(
        {"STREAMAGENT_SANDBOX_URL": "http://sandbox:1", "STREAMAGENT_TOOL_URLS": '{"notes": "https://notes.internal"}'}
    )
    assert s.tool_url("notes") == "https://notes.internal"
    assert s.tool_url("crm") == "http://sandbox:1"


@pytest.mark.parametrize(
    ("value", "reason"),
    [("{", "is not JSON"), ('["x"]', "JSON object"), ('{"notes": "ftp://x"}', "tool 'notes' must be an http")],
)
def test_bad_tool_urls_are_refused_naming_the_variable(value: str, reason: str) -> None:
    with pytest.raises(SettingsError, match=f"STREAMAGENT_TOOL_URLS=.* is invalid: .*{re.escape(reason)}"):
        settings_from({"STREAMAGENT_TOOL_URLS": value})


# -- tools from other packages: the entry-point group ------------------------------------------------
class _EntryPoint:
    def __init__(self, name: str, value: str, loaded: object) -> None:
        self.name, self.value, self._loaded = name, value, loaded

    def load(self) -> object:
        if isinstance(self._loaded, Exception):
            raise self._loaded
        return self._loaded


def test_an_entry_point_tool_is_found_and_a_broken_package_hides_no_other_tool(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import streamagent.tools as tools

    registered = [
        _EntryPoint("broken", "broken_tool.tool:Broken", ImportError("No module named 'requests'")),
        _EntryPoint("notes", "notes_tool:Notes", Notes),
        _EntryPoint("junk", "junk_tool:NotATool", object),
    ]
    monkeypatch.setattr(tools, "entry_points", lambda group: registered if group == "streamagent.tools" else [])
    found = tools.builtin_tools.__wrapped__()
    assert found["notes"] is Notes and {"crm", "enrich"} <= set(found) and "broken" not in found
    assert "broken_tool.tool:Broken cannot be loaded" in caplog.text and "not a Tool subclass" in caplog.text
