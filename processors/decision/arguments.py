"""Do a step's arguments fit the input schema a tool announced? A small JSON Schema check.

The decision layer checks a dispatch's arguments against the catalogue entry of the tool that would
run it, so a tool version whose input schema changed incompatibly is refused with a reason instead
of being called with arguments it cannot take. The check covers what tools' (pydantic-derived)
schemas say about their input: ``type``, ``required``, ``properties``, ``additionalProperties:
false``, ``enum``/``const``, ``items``, ``anyOf``/``oneOf``/``allOf`` and local ``$ref``s. Formats
and value bounds are left to the tool, which refuses such input as a permanent error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# tool name, arguments -> a description of why they do not fit (None: they fit, or nothing is known)
ArgumentCheck = Callable[[str, dict[str, Any]], str | None]

_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def no_check(tool: str, arguments: dict[str, Any]) -> str | None:
    return None


def mismatches(schema: dict[str, Any], value: Any, *, root: dict[str, Any] | None = None, at: str = "") -> list[str]:
    """Every way ``value`` does not fit ``schema`` (empty: it fits), each naming where."""
    root = schema if root is None else root
    where = at or "arguments"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(root, ref)
        if target is None:
            return []  # a reference this check cannot follow: say nothing rather than refuse
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            found = [mismatches(o, value, root=root, at=at) for o in options if isinstance(o, dict)]
            if found and all(found):
                return min(found, key=len)
    for sub in schema.get("allOf", []) or []:
        if isinstance(sub, dict) and (problems := mismatches(sub, value, root=root, at=at)):
            return problems
    if "const" in schema and value != schema["const"]:
        return [f"{where}: expected {schema['const']!r}, got {value!r}"]
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']!r}"]
    types = schema.get("type")
    if isinstance(types, str):
        types = [types]
    if isinstance(types, list) and types and not any(_TYPES.get(t, lambda _: True)(value) for t in types):
        return [f"{where}: expected {' or '.join(types)}, got {_type_name(value)}"]
    problems: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        for name in schema.get("required", []) or []:
            if name not in value:
                problems.append(f"missing required property {name!r}" + (f" in {at}" if at else ""))
        for name, item in value.items():
            sub = properties.get(name)
            path = f"{at}.{name}" if at else name
            if isinstance(sub, dict):
                problems += mismatches(sub, item, root=root, at=path)
            elif schema.get("additionalProperties") is False:
                problems.append(f"unexpected property {path!r}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += mismatches(schema["items"], item, root=root, at=f"{where}[{i}]")
    return problems


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any] | None:
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) else None


def _type_name(value: Any) -> str:
    for name, fits in _TYPES.items():
        if name != "number" and fits(value):
            return name
    return "number" if _TYPES["number"](value) else type(value).__name__


def catalogue_check(entry_of: Callable[[str], Any]) -> ArgumentCheck:
    """A check against the live catalogue: ``entry_of(name)`` is its ``ToolEntry`` (or None)."""

    def check(tool: str, arguments: dict[str, Any]) -> str | None:
        entry = entry_of(tool)
        if entry is None or not entry.input_schema:
            return None
        problems = mismatches(entry.input_schema, arguments)
        if not problems:
            return None
        return (
            f"tool {tool} version {entry.version} (input schema {entry.schema_fingerprint}) does not accept"
            f" the step's arguments: {'; '.join(problems)}"
        )

    return check
