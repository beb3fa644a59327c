"""A tool's retry policy is the runtime's one; re-exported here for tool authors."""

from streamagent.retry import RetryPolicy

__all__ = ["RetryPolicy"]
