"""A tool describes itself: the announcement is derived from its class attributes and models."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from pydantic import BaseModel
from streamagent.tools import builtin_tools
from streamagent.tools.jira import Jira, ProjectRequest
from streamagent.tools.sdk import PermanentError, Tool

from streamagent.catalogue import Announcement, decode, schema_fingerprint
from streamagent.retry import RetryPolicy


class Query(BaseModel):
    account: str
    limit: int = 10


class Found(BaseModel):
    ids: list[str]


class Lookup(Tool[Query, Found]):
    name = "lookup"
    description = "Find an account's records"
    input_model = Query
    output_model = Found
    version = "3"
    requires_approval = True
    timeout_s: ClassVar[float | None] = 2.5
    retry = RetryPolicy(initial_s=0.1, max_attempts=4)


def test_the_schemas_are_derived_from_the_models_not_written_twice() -> None:
    a = Lookup.declaration()
    assert a.input_schema == Query.model_json_schema()
    assert a.output_schema == Found.model_json_schema()
    assert a.input_schema["required"] == ["account"]
    assert (a.name, a.version, a.requires_approval, a.timeout_s) == ("lookup", "3", True, 2.5)
    assert a.retry == {"initial_s": 0.1, "multiplier": 2.0, "max_backoff_s": 2.0, "max_attempts": 4}
    assert a.schema_fingerprint == schema_fingerprint(Query.model_json_schema())


def test_a_member_announcement_round_trips_through_the_registry_encoding() -> None:
    a = Lookup.declaration(member_id="host-1", at_ms=1000, lease_ms=15000, started_at_ms=900)
    assert a.key() == b"lookup/host-1"
    assert decode(a.key(), a.encode()) == a


def test_the_original_announcement_keys_are_kept() -> None:
    for cls in builtin_tools().values():
        data = cls().announcement()
        assert {"name", "description", "input_schema", "output_schema", "requires_approval", "version"} <= set(data)
        assert Announcement.model_validate(data).member_id is None


def test_the_call_timeout_falls_back_to_the_setting() -> None:
    assert Lookup().call_timeout(5.0) == 2.5
    assert Jira().call_timeout(5.0) == 5.0  # the four tools keep the tool_timeout_s setting


def test_input_is_validated_against_the_declared_model() -> None:
    assert Lookup().parse({"account": "a1"}) == Query(account="a1", limit=10)
    with pytest.raises(PermanentError, match="invalid arguments for lookup"):
        Lookup().parse({"limit": "many"})
    with pytest.raises(PermanentError, match="key"):
        Jira().parse({"key": "lower", "name": "n", "lead_email": "a@b.io"})
    assert Jira.declaration().input_schema == ProjectRequest.model_json_schema()


def test_a_tool_that_cannot_describe_itself_fails_at_declaration() -> None:
    class NoDescription(Tool[Query, Found]):
        name = "nodesc"
        input_model = Query
        output_model = Found

    with pytest.raises(TypeError, match="does not declare description"):
        NoDescription.declaration()

    class NotAModel(Tool[Query, Found]):
        name = "notamodel"
        description = "x"
        input_model: Any = dict
        output_model = Found

    with pytest.raises(TypeError, match="input_model must be a pydantic model"):
        NotAModel.declaration()

    class BadName(Lookup):
        name = "Bad Name"

    with pytest.raises(TypeError, match="invalid"):
        BadName.declaration()


def test_every_tool_module_is_found_without_a_list() -> None:
    import types

    from streamagent.tools import _declared_in, builtin_tools

    ours = {name for name, cls in builtin_tools().items() if cls.__module__.startswith("streamagent.tools.")}
    # sdk/ and sandbox/ hold none, nor does drafting.py (the draft tool's prompt and checks)
    assert ours == {"enrich", "jira", "draft", "email", "slack", "crm"}
    module = types.ModuleType("streamagent.tools.fax")
    exec(  # a new tool file, as a team would add one
        "from pydantic import BaseModel\n"
        "from streamagent.tools.sdk import Tool\n"
        "class In(BaseModel):\n    number: str\n"
        "class Out(BaseModel):\n    sent: bool\n"
        "class Fax(Tool[In, Out]):\n    name = 'fax'\n    description = 'Send a fax'\n"
        "    input_model = In\n    output_model = Out\n"
        "from streamagent.tools.crm import Crm  # imported, not declared here: not this module's tool\n",
        module.__dict__,
    )
    assert [t.name for t in _declared_in(module)] == ["fax"]
