"""The tool SDK: write a ``Tool``; ``run_tool`` does consuming, dedupe, retries, breaker and results."""

from streamagent.tools.sdk.breaker import BreakerState, CircuitBreaker
from streamagent.tools.sdk.errors import PermanentError, RetryableError, ToolError
from streamagent.tools.sdk.retry import RetryPolicy
from streamagent.tools.sdk.tool import CallContext, Tool, body, check

__all__ = [
    "BreakerState",
    "CallContext",
    "CircuitBreaker",
    "PermanentError",
    "RetryPolicy",
    "RetryableError",
    "Tool",
    "ToolError",
    "body",
    "check",
]
