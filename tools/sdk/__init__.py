"""The tool SDK: write a ``Tool``; ``run_tool`` does consuming, dedupe, retries, breaker and results."""

from tools.sdk.breaker import BreakerState, CircuitBreaker
from tools.sdk.errors import PermanentError, RetryableError, ToolError
from tools.sdk.retry import RetryPolicy
from tools.sdk.tool import CallContext, Tool, body, check

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
