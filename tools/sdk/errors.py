"""How a tool tells the SDK what went wrong: try again later, or never."""

from __future__ import annotations


class ToolError(Exception):
    pass


class RetryableError(ToolError):
    """A transient failure (5xx, 429, timeout, connection refused). ``retry_after`` is a floor in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(ToolError):
    """The call can never succeed as asked (4xx, invalid input); retrying would only repeat it."""

    kind = "permanent"  # the result's error_kind


class UnknownOutcome(PermanentError):
    """A call that is not safe to repeat was started and its outcome is not known (the process died, or
    the connection broke, mid-call): reported as the step's failure instead of a second call."""

    kind = "unknown-outcome"
