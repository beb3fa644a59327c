"""The files of a new tool package (``streamagent new tool NAME``), as text with ``$placeholders``.

The generated code imports only the SDK's public names (``streamagent.tools.sdk.__all__``):
tests/unit/tools/test_tool_api.py parses it and fails on anything else, so a package written today
keeps working when the SDK's insides change.
"""

from __future__ import annotations

from string import Template

PYPROJECT = Template("""\
[build-system]
# setuptools 70.1 and later build wheels without the separate `wheel` package
requires = ["setuptools>=70.1"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "The $name tool for streamagent: its own consumer group, deployed with `streamagent tool $name`"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["streamagent"]

[project.optional-dependencies]
test = ["pytest"]

# How streamagent finds the tool: `streamagent tool $name` loads this class.
[project.entry-points."streamagent.tools"]
$name = "$module.tool:$cls"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
""")

INIT = Template('''\
"""The $name tool for streamagent."""

from $module.tool import $cls, ${cls}Input, ${cls}Output

__all__ = ["$cls", "${cls}Input", "${cls}Output"]
''')

TOOL = Template('''\
"""The $name tool: one call to the team's API per command, at most once per command id.

streamagent does the rest: consuming its command topic, verifying signatures and approvals, the
idempotency ledger, retries with backoff, timeouts, the circuit breaker, publishing the result.
"""

from __future__ import annotations

from pydantic import BaseModel
from streamagent.tools.sdk import CallContext, RetryPolicy, Tool, body


class ${cls}Input(BaseModel):
    """What a workflow step passes (its `args`); the model sees this model's JSON Schema."""

    subject: str
    text: str = ""


class ${cls}Output(BaseModel):
    """What later steps can use (`{steps.<step>.output.id}`)."""

    id: str


class $cls(Tool[${cls}Input, ${cls}Output]):
    name = "$name"  # the command topic and the consumer group are named after it
    description = "Create one $name item from a subject and a text"  # written for a model choosing a tool
    input_model = ${cls}Input
    output_model = ${cls}Output
    version = "1"  # change it with the behaviour
    timeout_s = 10.0  # of one HTTP call
    retry = RetryPolicy(initial_s=0.2, max_backoff_s=5.0)  # between retryable failures (429, 5xx, timeouts)

    async def call(self, args: ${cls}Input, ctx: CallContext) -> ${cls}Output:
        # ctx.request sends the command id as Idempotency-Key: an API that honours it turns a repeat
        # (a crash between the call and the ledger write) into the first answer, not a second effect.
        # 429 and 5xx raise RetryableError, other 4xx PermanentError: the SDK retries or gives up.
        response = await ctx.request("POST", "/v1/$path", json=args.model_dump())
        return ${cls}Output.model_validate(body(response))
''')

TEST = Template('''\
"""The $name tool against a fake API (no Kafka): run with `pytest`."""

from __future__ import annotations

import pytest
from streamagent.tools.sdk import FakeApi, PermanentError, RetryableError, call_tool

from $module import $cls


def test_one_item_per_command_and_a_repeat_is_no_second_effect() -> None:
    with FakeApi(lambda call: (201, {"id": "item-1"})) as api:
        first = call_tool($cls(), {"subject": "Welcome"}, api.url, command_id="cmd-1")
        again = call_tool($cls(), {"subject": "Welcome"}, api.url, command_id="cmd-1")
    assert first.id == again.id == "item-1"
    assert [(c.method, c.path, c.json) for c in api.effects] == [
        ("POST", "/v1/$path", {"subject": "Welcome", "text": ""})
    ]
    assert api.effects[0].idempotency_key == "cmd-1"


def test_a_busy_api_is_retried_and_a_refusal_is_not() -> None:
    with FakeApi(lambda call: (503, {"error": "busy"})) as api:
        with pytest.raises(RetryableError):
            call_tool($cls(), {"subject": "Welcome"}, api.url)
    with FakeApi(lambda call: (422, {"error": "subject too long"})) as api:
        with pytest.raises(PermanentError, match="subject too long"):
            call_tool($cls(), {"subject": "Welcome"}, api.url)


def test_invalid_arguments_are_refused_before_any_call() -> None:
    with FakeApi() as api:
        with pytest.raises(PermanentError, match="invalid arguments"):
            call_tool($cls(), {"text": "no subject"}, api.url)
    assert api.calls == []


def test_the_tool_describes_itself_for_the_catalogue() -> None:
    announced = $cls().announcement()
    assert announced["name"] == "$name"
    assert announced["input_schema"]["required"] == ["subject"]
''')

WORKFLOW = Template("""\
# A workflow that uses the $name tool. Workflows are data: keep this file with your own workflows
# (outside the streamagent repository) and list that folder in STREAMAGENT_WORKFLOWS_DIR.
name = "$name-example"
goal = "Record the new client as a $name item"
tools = ["$name"]

[[steps]]
name = "record"
tool = "$name"
args.subject = "New client {request.company_name}"
args.text = "{request.contact_name} <{request.contact_email}> of {request.company_domain}"
""")

README = Template("""\
# $dist

The `$name` tool for streamagent: a team's own tool in its own package, deployed
as its own consumer group.

- `src/$module/tool.py`: the tool (its input and output models and its one call).
- `tests/test_$module.py`: its tests against a fake API (no Kafka, no network).
- `workflows/$name-example.toml`: a workflow that uses it.

## Test

```bash
pip install '.[test]'
pytest
```

## Deploy

```bash
pip install .
# the tool calls its own API, not the SaaS sandbox: its base URL by tool name
export STREAMAGENT_TOOL_URLS='{"$name": "https://$name.example.internal"}'
streamagent tool $name          # a new consumer group; nothing else restarts
streamagent tools               # it is in the live catalogue
```

Runs that need it and were submitted before it started wait for it, then continue.

## Use it in a workflow

Keep workflows in a folder of your own and add it to the folders streamagent reads
(several are separated by `:`; a workflow name found twice is refused):

```bash
export STREAMAGENT_WORKFLOWS_DIR="/path/to/streamagent/workflows:$$PWD/workflows"
streamagent workflows check
streamagent submit --workflow $name-example --company-name Acme --company-domain acme.io \\
  --contact-name Ada --contact-email ada@acme.io --wait
```

Only `streamagent.tools.sdk`'s public names (`Tool`, `CallContext`, the errors, `RetryPolicy`, the
testing helpers) are stable; import nothing else from streamagent.
""")
