"""The tool SDK's public API: everything a tool author may import, and nothing else.

A tool (in this repository or in a team's own package) imports only the names of ``__all__`` below,
from ``streamagent.tools.sdk``; they are kept stable (docs/guides/tool-api.md lists them, and
tests/unit/tools/test_tool_api.py fails if one goes). Every other module under ``streamagent.tools.sdk``
(the runner, ledger, admission, breaker, ...) is the runtime's own and may change in any release.

The testing helpers (``FakeApi``, ``call_tool``, ...) are imported on first use: a tool process never
loads the HTTP server they bring.
"""

from typing import Any

from streamagent.tools.sdk.errors import PermanentError, RetryableError, ToolError
from streamagent.tools.sdk.retry import RetryPolicy
from streamagent.tools.sdk.tool import CallContext, Tool, body, check

__all__ = [
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
]

_TESTING = {"ApiCall", "FakeApi", "acall_tool", "call_tool"}


def __getattr__(name: str) -> Any:
    if name in _TESTING:
        from streamagent.tools.sdk import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
