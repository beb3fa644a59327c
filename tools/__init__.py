"""The tools: each is its own consumer group and OS process (``streamagent tool NAME``).

A tool is one module here that defines a ``Tool`` subclass (see ``sdk/tool.py``); nothing lists it.
A tool shipped in another package registers under the ``streamagent.tools`` entry-point group
(``[project.entry-points."streamagent.tools"] crm = "mypkg.crm:Crm"``) and deploys the same way.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from streamagent.tools.sdk.tool import Tool

log = logging.getLogger(__name__)

# Subpackages that hold no tool: the SDK itself, the SaaS stand-in, and the MCP bridge (its tools are
# an MCP server's, deployed with `streamagent tool mcp --server NAME`).
_NOT_TOOLS = {"sdk", "sandbox", "mcp"}
ENTRY_POINT_GROUP = "streamagent.tools"


def _declared_in(module: Any) -> list[type[Tool[Any, Any]]]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Tool)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
        and isinstance(getattr(obj, "name", None), str)
    ]


@cache
def builtin_tools() -> dict[str, type[Tool[Any, Any]]]:
    """Every tool: those defined by a module of this package, then those registered by entry point."""
    found: dict[str, type[Tool[Any, Any]]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_TOOLS or info.name.startswith("_"):
            continue
        for tool in _declared_in(importlib.import_module(f"{__name__}.{info.name}")):
            found.setdefault(tool.name, tool)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            tool = ep.load()
        except Exception as exc:  # one team's broken package must not take every other tool down with it
            log.warning("entry point %s = %s cannot be loaded (%r); ignored", ep.name, ep.value, exc)
            continue
        if not (inspect.isclass(tool) and issubclass(tool, Tool)):
            log.warning("entry point %s = %s is not a Tool subclass; ignored", ep.name, ep.value)
            continue
        if tool.name in found and found[tool.name] is not tool:
            log.warning("entry point %s: a tool named %r exists already; ignored", ep.value, tool.name)
            continue
        found[tool.name] = tool
    return found
