"""What the model is offered and how its answer is read, in both answer styles.

``tools``: OpenAI tool calling. The offered tools are functions with the catalogue's input schemas,
plus the pseudo-tools ``complete``, ``escalate(reason)`` and ``wait(tool)``; the answer is one tool call.
``json_schema``: ``response_format`` constrains the answer to ``{"tool": ..., "arguments": {...}}``
(one branch per offered name), which grammar-constrained local servers always answer validly.
``json_object``: the same schema in the older ``{"type": "json_object", "schema": ...}`` form, the
only one llama-cpp-python's server (``python -m llama_cpp.server``) takes; it refuses ``json_schema``.

A content answer holding that JSON object is accepted in the ``tools`` style too: small models often
answer bare JSON instead of a tool call, and what they meant is then still checked like any answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from streamagent.processors.decision.llm.context import OfferedTool

PSEUDO_SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "complete": (
        "Every step succeeded: end the run as completed.",
        {"type": "object", "properties": {}, "additionalProperties": False},
    ),
    "escalate": (
        "You are stuck or something looks wrong: hand the run to a human, saying why.",
        {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "Why a human must take over"}},
            "required": ["reason"],
            "additionalProperties": False,
        },
    ),
    "wait": (
        "The next step's tool is unavailable: wait until it is back.",
        {
            "type": "object",
            "properties": {"tool": {"type": "string", "description": "The unavailable tool"}},
            "required": ["tool"],
            "additionalProperties": False,
        },
    ),
}


class Refused(ValueError):
    """An answer that cannot be taken; the message is quoted to the model in the repair turn."""


class ModelAnswer(BaseModel):
    """The model's choice: a tool (or pseudo-tool) and its arguments."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


def _parameters(schema: dict[str, Any]) -> dict[str, Any]:
    return schema if schema.get("type") == "object" else {"type": "object", "properties": {}}


def tool_specs(offered: Sequence[OfferedTool]) -> list[dict[str, Any]]:
    """The ``tools`` parameter of a chat completion: the offered tools, then the pseudo-tools."""
    specs = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": _parameters(t.input_schema)},
        }
        for t in offered
    ]
    for name, (description, schema) in PSEUDO_SCHEMAS.items():
        specs.append({"type": "function", "function": {"name": name, "description": description, "parameters": schema}})
    return specs


def response_format(offered: Sequence[OfferedTool], style: str = "json_schema") -> dict[str, Any]:
    """The ``response_format`` of the ``json_schema`` (or ``json_object``) style: one branch per name, with
    its arguments' schema."""
    branches = [(t.name, _parameters(t.input_schema)) for t in offered]
    branches += [(name, schema) for name, (_, schema) in PSEUDO_SCHEMAS.items()]
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"tool": {"const": name}, "arguments": arguments},
                "required": ["tool", "arguments"],
            }
            for name, arguments in branches
        ]
    }
    if style == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "decision", "schema": schema}}


def _from_json(text: str, where: str) -> ModelAnswer:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Refused(f"{where} is not valid JSON ({exc.msg} at character {exc.pos}): {text[:200]!r}") from None
    try:
        return ModelAnswer.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(p) for p in first["loc"]) or "answer"
        raise Refused(f'{where} must be {{"tool": <name>, "arguments": {{...}}}}: {at}: {first["msg"]}') from None


def parse(message: Any) -> ModelAnswer:
    """The answer in a chat completion's ``message`` (the openai client's object); raises ``Refused``."""
    calls = parse_calls(message)
    if len(calls) > 1:
        names = ", ".join(c.tool if isinstance(c, ModelAnswer) else "?" for c in calls)
        raise Refused(f"one step at a time: answer with exactly one call, not {len(calls)} ({names})")
    if isinstance(calls[0], Refused):
        raise calls[0]
    return calls[0]


def parse_calls(message: Any) -> list[ModelAnswer | Refused]:
    """Every call of the answer, each read on its own (a call that cannot be read is its ``Refused``, so the
    others still count: a model may call several tools at once); raises ``Refused`` for no answer at all."""
    calls = list(getattr(message, "tool_calls", None) or [])
    if calls:
        return [_call(c.function) for c in calls]
    return [_content(message)]


def _call(function: Any) -> ModelAnswer | Refused:
    text = function.arguments or "{}"
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as exc:
        return Refused(
            f"the arguments of {function.name} are not valid JSON ({exc.msg} at character {exc.pos}): {text[:200]!r}"
        )
    if not isinstance(arguments, dict):
        return Refused(f"the arguments of {function.name} must be a JSON object, not {type(arguments).__name__}")
    return ModelAnswer(tool=function.name, arguments=arguments)


def _content(message: Any) -> ModelAnswer:
    content = (getattr(message, "content", None) or "").strip()
    if not content:
        raise Refused("the answer is empty: answer with one call")
    if content.startswith("```"):  # a fenced block: what small models wrap JSON in
        content = content.strip("`").removeprefix("json").strip()
    return _from_json(content, "the answer")
